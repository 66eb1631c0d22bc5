"""V-NIAH: find one needle frame among N haystack frames, on any long video.

    <system prompt + "user\\n"> frames[0:k] needle frames[k:N] <question><|im_end|>\\n<|im_start|>assistant\\n <answer>

with k = int(depth * N), haystack frames taken at 1 frame a second and padded to a square
of the CLIP mean colour (the original's `expand2square`), each 144 tokens. The haystack's
embeddings are computed once, in blocks, and kept in the engine's visual cache by the video's
content, the model and the preprocessing; a larger grid only adds the missing frames.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from longva_cli import media as media_io
from longva_cli.engine.visual_cache import CacheEntry, VisualCache
from longva_cli.errors import LongVAError
from longva_cli.niah.grid import Unit

if TYPE_CHECKING:  # torch loads only once a run starts: bad input fails fast
    import torch

    from longva_cli.engine.sequence import Sequence

HAYSTACK_FPS = 1.0
BLOCK_FRAMES = 256  # frames per cache block: a killed embedding pass keeps all finished blocks


# ---- haystack ---------------------------------------------------------------------------


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


def haystack_entry(cache: VisualCache, longva, path: Path) -> CacheEntry:
    """The cache entry of a haystack: its 1-fps square-padded frames, from the first, for this
    model; keyed as the encoder keys any media (no frame cap: blocks are added as runs need more)."""
    from longva_cli.engine.encoder import MediaSpec, cache_key, content_of

    return cache.entry(cache_key(longva, MediaSpec(path, fps=HAYSTACK_FPS, pad_to_square=True), content_of(path, cache)))


def embed_haystack(
    longva,
    path: Path,
    count: int,
    entry: CacheEntry,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> None:
    """Make sure `entry` holds the embeddings of the first `count` 1-fps frames of `path`."""
    from longva_cli.defaults import VISION_BATCH
    from longva_cli.engine.encoder import encode_batches
    from longva_cli.engine.objectives import drive

    done = entry.stored()
    if on_start:
        on_start(max(count - done, 0))
    if done >= count:
        return
    video, ids = haystack_frame_ids(path, count)
    for start in range(done, count, BLOCK_FRAMES):
        stop = min(start + BLOCK_FRAMES, count)
        encoded = [start]

        def progress(event, encoded=encoded) -> None:
            if on_progress:
                on_progress(start + event.done - encoded[0])
            encoded[0] = start + event.done

        batches = video.pixel_batches(ids[start:stop], longva.processing, batch_size=VISION_BATCH, pad_to_square=True)
        embeds = drive(encode_batches(longva, batches, stop - start, pad_to_square=True), progress)  # [b, 144, d]
        entry.append(start, embeds)


def prepare_haystack(longva, path: Path, count: int, entry: CacheEntry, on_start=None, on_progress=None) -> None:
    """Embed what the cache lacks of the first `count` frames, then check every stored block;
    a damaged block (a bad disk, an edit) is deleted, said on stderr and embedded again. A failed
    write (a full disk) is one sentence: V-NIAH reads its haystack from the cache."""
    from safetensors import SafetensorError

    from longva_cli.console import escape, stderr

    for _ in range(2):  # the damaged blocks of the first pass are embedded again in the second
        try:
            embed_haystack(longva, path, count, entry, on_start, on_progress)
        except (OSError, SafetensorError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
            raise LongVAError(
                f"could not write the haystack's embeddings to {entry.folder} ({reason}); free some space there or "
                "choose another --cache-dir, then run again (finished blocks are kept)."
            ) from None
        problems = entry.verify(count)
        if not problems:
            return
        for problem in problems:
            stderr.print(f"[yellow]warning:[/yellow] {escape(problem)}.")
    raise LongVAError(f"the haystack cache {entry.folder} stays damaged after embedding it again; delete that folder, or choose another --cache-dir.")


def load_haystack(entry: CacheEntry, count: int, device: torch.device) -> torch.Tensor:
    """[count, 144, d] cached haystack embeddings on `device`."""
    from longva_cli.engine.visual_cache import DamagedEntry

    try:
        embeds = entry.load(count, device)
    except DamagedEntry as err:
        raise LongVAError(f"{err}: run the same command again.") from None
    if embeds is None:
        raise LongVAError(f"the haystack cache {entry.folder} holds {entry.stored()} frames, fewer than {count}; delete it and run again.")
    return embeds


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
            needles.append(Needle(media_io.image_from_bytes(data, f"{file} (needle {len(needles) + 1})"), str(row["question"]), str(row["answer"])))
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
        if not isinstance(row["image"], str):
            raise LongVAError(f"{file} needle {number}: \"image\" must be a file name relative to {folder}, got {row['image']!r}.")
        image = media_io.open_image(media_io.check_file(folder / row["image"]))
        if image is None:
            raise LongVAError(f"{folder / row['image']} (needle {number}) is not an image that can be read.")
        needles.append(Needle(image, str(row["question"]), str(row["answer"])))
    return needles


# ---- sequences --------------------------------------------------------------------------


class VideoNeedlePrompts:
    """Builds the sequence of any (frames, depth, needle) from cached embeddings, without copies."""

    def __init__(self, longva, haystack: torch.Tensor, needles: list[Needle], needle_embeds: torch.Tensor, haystack_identity: int | None = None) -> None:
        from longva_cli.engine.sequence import Visual, identity_of, tokenize
        from longva_cli.model.prompt import IMAGE_PLACEHOLDER, Turn, chat_prompt

        self.longva = longva
        self.tokens = haystack.shape[1]
        frames = haystack.flatten(0, 1)  # [frames * 144, d]
        self.haystack = Visual(frames, "video", haystack.shape[0])
        if haystack_identity is not None:  # the cache entry's: runs on the same haystack share keys
            self.haystack.identity = haystack_identity
        # needle i of this run: its keys differ from every other needle's and every frame's
        self.needles = [Visual(embeds, "image", 1, identity=identity_of("needle", i, n.question, n.answer)) for i, (n, embeds) in enumerate(zip(needles, needle_embeds))]
        self.questions, self.answers = [], []
        for needle in needles:
            # the system prompt and "user\n" come before the frames, the question after them
            before, after = chat_prompt([Turn("user", IMAGE_PLACEHOLDER + needle.question)]).split(IMAGE_PLACEHOLDER)
            self.questions.append(tokenize(longva.tokenizer, after))
            self.answers.append(tokenize(longva.tokenizer, needle.answer))
        self.prefix = tokenize(longva.tokenizer, before)

    def answer_ids(self, needle: int) -> list[int]:
        return self.answers[needle].tolist()

    def sequence(self, frames: int, depth: float, needle: int, with_answer: bool) -> Sequence:
        from longva_cli.engine.sequence import build

        at = int(depth * frames) * self.tokens  # needle frame index int(depth * N), in tokens
        end = frames * self.tokens
        parts = [self.prefix, self.haystack.slice(0, at), self.needles[needle], self.haystack.slice(at, end), self.questions[needle]]
        if with_answer:
            parts.append(self.answers[needle])
        return build(self.longva, [part for part in parts if len(part)])


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


def plan_haystack(settings, frames: int, ranks):
    """The settings the run loads with (`plan.fit_budget`), planned for the largest haystack (the
    needle frame and the question are within the plan's allowance for text): the model's dtype, then an fp8 KV cache, then the haystack in host memory with
    the tower released, then 4-bit weights. Not planned where one sequence spans several devices
    (--device-map, --sequence-parallel): there is no one device to plan for."""
    from longva_cli.display import say_plan
    from longva_cli.engine.plan import Fitted, fit_budget, plan_for

    if settings.device_map is not None or settings.sequence_parallel > 1:
        return Fitted(None, settings.kv_cache)
    return fit_budget(
        lambda: plan_for(
            settings.model, None, images=frames, max_new_tokens=settings.max_new_tokens, prefill_chunk=settings.prefill_chunk,
            device=str(ranks.device(settings.device)), dtype=settings.dtype, quantize=None, kv_cache=settings.kv_cache,
            budget=settings.memory_budget,
        ),
        say_plan if ranks.is_main else (lambda line: None), quantize=None, kv_cache=settings.kv_cache, frames_flag="--max-frames",
    )


def run_video(settings, *, overwrite: bool = False):
    """V-NIAH over the settings' grid; resumes a folder of the same settings. -> GridRun (rank 0) or None."""
    from longva_cli.niah.settings import check_video, identity

    sizes, depths = check_video(settings)
    path = Path(settings.haystack).expanduser()
    haystack_frame_ids(path, max(sizes))  # bad input fails before torch and the model load
    needles = load_needles(settings.needles)
    from longva_cli.console import progress
    from longva_cli.engine.encoder import embeddings_home, encode_batches, kept, release_vision_tower
    from longva_cli.engine.loader import load
    from longva_cli.engine.objectives import drive
    from longva_cli.engine.sequence import identity_of
    from longva_cli.engine.sequence_parallel import runner_for
    from longva_cli.engine.visual_cache import default_cache_dir
    from longva_cli.niah.grid import check_device_map, score_grid
    from longva_cli.niah.results import prepare_folder
    from longva_cli.niah.scoring import answer_matches, greedy, teacher_forced
    from longva_cli.parallel.ranks import join
    from longva_cli.recipes import to_dict

    cache = VisualCache(settings.cache_dir or default_cache_dir())  # checks $LONGVA_CACHE_MAX_GB before any work
    ranks = join(settings.sequence_parallel)
    fitted = plan_haystack(settings, max(sizes), ranks)
    settings = replace(settings, kv_cache=fitted.kv_cache)  # the plan's KV storage moves scores: it is in the identity
    run_identity = {**identity(settings), "haystack": f"{path.name} (content {cache.file_hash(path)})"}
    if fitted.quantize:
        run_identity["quantize"] = fitted.quantize
    if ranks.is_main:
        prepare_folder(settings.output, "video", to_dict(settings), run_identity, overwrite)
    ranks.barrier()  # no rank reads the folder before rank 0 has checked (or cleared) it
    check_device_map(ranks, settings.device_map)
    longva = load(
        settings.model, device=ranks.device(settings.device), device_map=settings.device_map, dtype=settings.dtype, attn=settings.attn,
        kv_cache=settings.kv_cache, quantize=fitted.quantize,
    )
    entry = haystack_entry(cache, longva, path)
    if ranks.is_main and entry.stored() < max(sizes):  # one rank embeds, the others wait and read the cache
        with progress(unit="frames") as bar:
            task = bar.add_task("haystack frames", total=None)
            prepare_haystack(
                longva, path, max(sizes), entry,
                on_start=lambda n: bar.update(task, total=n), on_progress=lambda n: bar.advance(task, n),
            )
    elif ranks.is_main:
        prepare_haystack(longva, path, max(sizes), entry)  # checks the stored blocks, embeds damaged ones again
    if ranks.is_main:
        cache.evict(keep=entry)
    ranks.barrier()
    on_host = fitted.visual_tokens_on_host
    haystack = kept(longva, load_haystack(entry, max(sizes), embeddings_home(longva, on_host)), on_host)  # [frames, 144, d]
    needle_embeds = drive(encode_batches(longva, [[n.image for n in needles]], len(needles), pad_to_square=True))  # [needles, 144, d]
    if on_host:
        release_vision_tower(longva)  # every frame the run needs is encoded
    prompts = VideoNeedlePrompts(longva, haystack, needles, needle_embeds, haystack_identity=identity_of(json.dumps(entry.key, sort_keys=True)))
    runner = runner_for(longva.model.language_model, settings)

    def score(unit: Unit) -> dict:
        needle = needles[unit.index]
        answer_ids = prompts.answer_ids(unit.index)
        teacher = settings.scoring == "teacher-forced"
        sequence = prompts.sequence(unit.size, unit.depth, unit.index, with_answer=teacher)
        if teacher:
            predicted = teacher_forced(runner, sequence, answer_ids)
            text = longva.tokenizer.decode(predicted)
            found = predicted == answer_ids
        else:
            predicted = greedy(longva, runner, sequence, settings.max_new_tokens)
            text = longva.tokenizer.decode(predicted, skip_special_tokens=True).strip()
            found = answer_matches(text, needle.answer)
        return {"found": found, "answer": needle.answer, "predicted": text, "answer_ids": answer_ids, "predicted_ids": predicted}

    units = video_units(sizes, depths, len(needles))
    title = f"V-NIAH {Path(settings.model).name} on {path.name}"
    return score_grid(units, score, settings.output, "video", ranks, title, lambda: runner.forwarded)
