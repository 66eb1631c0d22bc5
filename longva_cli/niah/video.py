"""V-NIAH: find one needle frame among N haystack frames, on any long video.

    <system prompt + "user\\n"> frames[0:k] needle frames[k:N] <question><|im_end|>\\n<|im_start|>assistant\\n <answer>

with k = int(depth * N), haystack frames taken at 1 frame a second and padded to a square
of the CLIP mean colour (the original's `expand2square`), each 144 tokens. The haystack's
embeddings are computed once, in blocks, and cached on disk by the video's content, the model
and the preprocessing; a larger grid only adds the missing frames.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from longva_cli.errors import LongVAError
from longva_cli.model import media as media_io
from longva_cli.niah.grid import Unit

if TYPE_CHECKING:  # torch loads only once a run starts: bad input fails fast
    import torch

    from longva_cli.model.prefix_cache import Sequence

HAYSTACK_FPS = 1.0
BLOCK_FRAMES = 256  # frames per cache file: a killed embedding pass keeps all finished blocks
VISION_BATCH = 16
# Position keys (see prefix_cache.Sequence): text tokens are their ids; frame tokens get ids far
# above any vocabulary, one range for haystack frames and one for needles.
HAYSTACK_KEYS = 1 << 40
NEEDLE_KEYS = 1 << 50


# ---- haystack ---------------------------------------------------------------------------


def content_hash(path: Path, samples: int = 16, block: int = 1 << 20) -> str:
    """A fingerprint of a (possibly many-GB) file: its size and 16 evenly spaced 1 MiB blocks."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        if size <= samples * block:
            digest.update(handle.read())
        else:
            for i in range(samples):
                handle.seek(i * (size - block) // (samples - 1))
                digest.update(handle.read(block))
    return digest.hexdigest()[:20]


def model_fingerprint(folder: Path) -> str:
    """The checkpoint's identity for the cache: config and each weight file's name, size and time."""
    parts = [(folder / "config.json").read_text()]
    for file in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        stat = file.stat()
        parts.append(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "longva" / "niah"


def haystack_frame_ids(path: Path, count: int) -> tuple[media_io.Video, list[int]]:
    """The video and its first `count` 1-fps frame ids; a clear error when it is too short."""
    video = media_io.open_video(media_io.check_file(path))
    ids = media_io.frame_ids_at_fps(video.num_frames, video.fps, HAYSTACK_FPS)
    if len(ids) < count:
        minutes, seconds = divmod(len(ids), 60)
        raise LongVAError(
            f"{path} has {len(ids)} frames at 1 frame a second ({minutes} min {seconds} s), fewer than the {count} "
            f"the grid needs; lower --max-frames to at most {len(ids)} or use a longer video."
        )
    return video, ids[:count]


def stored_blocks(folder: Path) -> list[tuple[int, int, Path]]:
    """Cached (start, stop, file) blocks that continue each other from frame 0."""
    found = {}
    for file in folder.glob("frames-*.safetensors"):
        match = re.fullmatch(r"frames-(\d+)-(\d+)\.safetensors", file.name)
        if match:
            found[int(match[1])] = (int(match[1]), int(match[2]), file)
    chain, stop = [], 0
    while stop in found:
        chain.append(found[stop])
        stop = found[stop][1]
    return chain


def embed_haystack(
    longva,
    path: Path,
    count: int,
    folder: Path,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> None:
    """Make sure `folder` caches the embeddings of the first `count` 1-fps frames of `path`."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    blocks = stored_blocks(folder)
    done = blocks[-1][1] if blocks else 0
    if on_start:
        on_start(max(count - done, 0))
    if done >= count:
        return
    video, ids = haystack_frame_ids(path, count)
    for start in range(done, count, BLOCK_FRAMES):
        stop = min(start + BLOCK_FRAMES, count)
        batches = video.batches(ids[start:stop], VISION_BATCH)
        embeds = longva.encode_frames(batches, stop - start, pad_to_square=True, on_progress=on_progress)  # [b, 144, d]
        temporary = folder / f"partial-{start:06d}.safetensors"
        save_file({"embeds": embeds.cpu().contiguous()}, str(temporary))
        os.replace(temporary, folder / f"frames-{start:06d}-{stop:06d}.safetensors")


def load_haystack(folder: Path, count: int, device: torch.device) -> torch.Tensor:
    """[count, 144, d] cached haystack embeddings on `device`."""
    import torch
    from safetensors.torch import load_file

    parts, have = [], 0
    for _, stop, file in stored_blocks(folder):
        if have >= count:
            break
        parts.append(load_file(str(file), device=str(device))["embeds"])
        have = stop
    if have < count:
        raise LongVAError(f"the haystack cache {folder} holds {have} frames, fewer than {count}; delete it and run again.")
    return torch.cat(parts)[:count]


def haystack_cache_folder(root: Path, video_hash: str, model_key: str, dtype: torch.dtype, tokens: int) -> Path:
    """One folder per (video content, checkpoint, dtype, preprocessing)."""
    key = {"video": video_hash, "model": model_key, "dtype": str(dtype), "fps": HAYSTACK_FPS, "pad_to_square": True, "tokens": tokens}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    folder = root / digest
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "key.json").write_text(json.dumps(key, indent=2) + "\n")
    return folder


# ---- needles ----------------------------------------------------------------------------


@dataclass
class Needle:
    image: Image.Image
    question: str  # used verbatim after the frames; the hub needles begin with a newline
    answer: str


def load_needles(source: str) -> list[Needle]:
    """The hub data set's test split (parquet), or a folder of images + needles.jsonl/.json."""
    folder = needle_folder(source)
    parquet = sorted(folder.rglob("*.parquet"))
    test_split = [p for p in parquet if "test" in p.name] or parquet
    needles = parquet_needles(test_split) if test_split else json_needles(folder)
    if not needles:
        raise LongVAError(f"--needles {source} holds no needles; add at least one {{image, question, answer}}.")
    return needles


def needle_folder(source: str) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise LongVAError(f"--needles {source} is a file; give a folder with images and needles.jsonl, or v_niah_needles.")
    if source.startswith((".", "/", "~")):
        raise LongVAError(f"--needles folder {source} does not exist; check the path.")
    from longva_cli import hub

    folder = hub.cached(source, repo_type="dataset")
    if folder is None:
        raise LongVAError(
            f"the needles {source} are not downloaded; run `longva download {source}`, or give --needles FOLDER "
            "(images plus needles.jsonl lines of image, question, answer)."
        )
    return folder


def parquet_needles(files: list[Path]) -> list[Needle]:
    """Rows of the HF data set: image {bytes, path}, question, answer."""
    import io

    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LongVAError("reading the needle data set needs pyarrow: `pip install pyarrow`.") from None
    needles = []
    for file in files:
        for row in pq.read_table(file).to_pylist():
            missing = [k for k in ("image", "question", "answer") if row.get(k) in (None, "")]
            if missing:
                raise LongVAError(f"{file} has a needle without {missing[0]}; each row needs image, question and answer.")
            image = row["image"]
            data = image.get("bytes") if isinstance(image, dict) else image
            needles.append(Needle(Image.open(io.BytesIO(data)).convert("RGB"), str(row["question"]), str(row["answer"])))
    return needles


def json_needles(folder: Path) -> list[Needle]:
    """needles.jsonl (one {image, question, answer} a line) or needles.json (a list); images relative to the folder."""
    candidates = [folder / "needles.jsonl", folder / "needles.json"] + sorted(folder.glob("*.jsonl")) + sorted(folder.glob("*.json"))
    file = next((c for c in candidates if c.is_file()), None)
    if file is None:
        raise LongVAError(
            f"--needles {folder} has no needles.jsonl; write one line per needle: "
            '{"image": "note.png", "question": "\\nWhat is written on the note?", "answer": "B"}.'
        )
    text = file.read_text(encoding="utf-8")
    try:
        rows = json.loads(text) if file.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise LongVAError(f"{file} is not valid JSON (line {err.lineno}); fix it.") from None
    needles = []
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise LongVAError(f"{file} needle {number} is not an object with image, question and answer.")
        missing = [k for k in ("image", "question", "answer") if row.get(k) in (None, "")]
        if missing:
            raise LongVAError(f"{file} needle {number} has no {missing[0]}; every needle needs image, question and answer.")
        image = media_io.open_image(media_io.check_file(folder / row["image"]))
        if image is None:
            raise LongVAError(f"{folder / row['image']} (needle {number}) is not an image that can be read.")
        needles.append(Needle(image, str(row["question"]), str(row["answer"])))
    return needles


# ---- sequences --------------------------------------------------------------------------


class VideoNeedlePrompts:
    """Builds the sequence of any (frames, depth, needle) from cached embeddings, without copies."""

    def __init__(self, longva, haystack: torch.Tensor, needles: list[Needle], needle_embeds: torch.Tensor) -> None:
        import torch

        from longva_cli.model.prompt import (
            IMAGE_PLACEHOLDER,
            Turn,
            chat_prompt,
            tokenize_segments,
        )

        self.tokens = haystack.shape[1]
        self.haystack = haystack.flatten(0, 1)  # [frames * 144, d]
        self.needles = needle_embeds  # [needles, 144, d]
        self.questions, self.answers = [], []
        for needle in needles:
            # the system prompt and "user\n" come before the frames, the question after them
            prompt = chat_prompt([Turn("user", IMAGE_PLACEHOLDER + needle.question)])
            before, after = tokenize_segments(longva.tokenizer, prompt)
            answer = torch.tensor(longva.tokenizer(needle.answer, add_special_tokens=False).input_ids, dtype=torch.long)
            self.questions.append(self._text(longva, after))
            self.answers.append(self._text(longva, answer))
        self.prefix = self._text(longva, before)

    @staticmethod
    def _text(longva, ids: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        import torch

        with torch.inference_mode():
            return ids.numpy().astype(np.int64), longva.model.embed_tokens(ids)

    def answer_ids(self, needle: int) -> list[int]:
        return self.answers[needle][0].tolist()

    def sequence(self, frames: int, depth: float, needle: int, with_answer: bool) -> Sequence:
        from longva_cli.model.prefix_cache import pieces_sequence

        at = int(depth * frames) * self.tokens  # needle frame index int(depth * N), in tokens
        end = frames * self.tokens
        pieces = [
            self.prefix,
            (np.arange(HAYSTACK_KEYS, HAYSTACK_KEYS + at), self.haystack[:at]),
            (np.arange(NEEDLE_KEYS + needle * self.tokens, NEEDLE_KEYS + (needle + 1) * self.tokens), self.needles[needle]),
            (np.arange(HAYSTACK_KEYS + at, HAYSTACK_KEYS + end), self.haystack[at:end]),
            self.questions[needle],
        ]
        if with_answer:
            pieces.append(self.answers[needle])
        return pieces_sequence([p for p in pieces if len(p[0])])


def video_units(sizes: list[int], depths: list[float], needles: int) -> list[Unit]:
    """Ordered by (needle index k, needle, N): each sequence shares the longest prefix with the last.

    Cells at the same k (all of depth 0) even share the needle and the frames after it.
    """
    return [
        Unit(frames, depth, needle, order=(int(depth * frames), needle, frames))
        for frames in sizes
        for depth in depths
        for needle in range(needles)
    ]


# ---- the run ----------------------------------------------------------------------------


def run_video(settings, *, overwrite: bool = False):
    """V-NIAH over the settings' grid; resumes a folder of the same settings. -> GridRun (rank 0) or None."""
    from longva_cli.niah.settings import check_video, identity

    sizes, depths = check_video(settings)
    path = Path(settings.haystack).expanduser()
    haystack_frame_ids(path, max(sizes))  # bad input fails before torch and the model load
    needles = load_needles(settings.needles)
    from longva_cli.console import progress
    from longva_cli.hub import locate_model
    from longva_cli.model.longva import LongVA
    from longva_cli.niah.grid import Ranks, score_grid
    from longva_cli.niah.results import prepare_folder
    from longva_cli.model.prefix_cache import PrefixCache
    from longva_cli.niah.scoring import answer_matches, greedy, teacher_forced
    from longva_cli.recipes import to_dict

    ranks = Ranks(settings.sequence_parallel)
    run_identity = {**identity(settings), "haystack": f"{path.name} (content {content_hash(path)})"}
    if ranks.main:
        prepare_folder(settings.output, "video", to_dict(settings), run_identity, overwrite)
    ranks.barrier()  # no rank reads the folder before rank 0 has checked (or cleared) it
    folder = locate_model(settings.model)
    ranks.check_device_map(settings.device_map)
    longva = LongVA.from_pretrained(
        str(folder), device=ranks.device(settings.device), device_map=settings.device_map, dtype=settings.dtype, attn_implementation=settings.attn
    )
    cache_folder = haystack_cache_folder(
        settings.cache_dir or default_cache_dir(), content_hash(path), model_fingerprint(folder), longva.model.dtype, longva.model.tokens_per_image
    )
    if ranks.main:  # one rank embeds, the others wait and read the cache
        with progress(unit="frames") as bar:
            task = bar.add_task("haystack frames", total=None)
            embed_haystack(
                longva, path, max(sizes), cache_folder,
                on_start=lambda n: bar.update(task, total=n), on_progress=lambda n: bar.advance(task, n),
            )
    ranks.barrier()
    haystack = load_haystack(cache_folder, max(sizes), longva.model.device)  # [frames, 144, d]
    needle_embeds = longva.encode_frames([[n.image for n in needles]], len(needles), pad_to_square=True)  # [needles, 144, d]
    prompts = VideoNeedlePrompts(longva, haystack, needles, needle_embeds)
    if settings.sequence_parallel > 1:
        from longva_cli.niah.sharded import sharded_forward

        cache = sharded_forward(longva.model.language_model, settings.sequence_parallel)
    else:
        cache = PrefixCache(longva.model.language_model, settings.prefill_chunk)

    def score(unit: Unit) -> dict:
        needle = needles[unit.index]
        answer_ids = prompts.answer_ids(unit.index)
        teacher = settings.scoring == "teacher-forced"
        sequence = prompts.sequence(unit.size, unit.depth, unit.index, with_answer=teacher)
        if teacher:
            predicted = teacher_forced(cache, sequence, answer_ids)
            text = longva.tokenizer.decode(predicted)
            found = predicted == answer_ids
        else:
            predicted = greedy(cache, sequence, longva.stop_ids, settings.max_new_tokens)
            text = longva.tokenizer.decode(predicted, skip_special_tokens=True).strip()
            found = answer_matches(text, needle.answer)
        return {"found": found, "answer": needle.answer, "predicted": text, "answer_ids": answer_ids, "predicted_ids": predicted}

    units = video_units(sizes, depths, len(needles))
    title = f"V-NIAH {Path(settings.model).name} on {path.name}"
    return score_grid(units, score, settings.output, "video", ranks, title, lambda: cache.forwarded)
