"""Media -> pixels -> visual tokens: the one path every command (and training) takes.

    video  sample frame ids (N uniform, or F a second)  -> decode in batches -> CLIP preprocessing
    image  UniRes: best pinpoint, resize and pad, 336-px crops row by row -> CLIP preprocessing
    then   tower -> layer -2 -> drop CLS -> projector -> 2x2 pool = 144 tokens per frame or crop

`encode` yields `Encoding` progress events and returns a `Visual` (see `run.drive`); a
consumer that stops iterating stops the decoding between batches. With a `VisualCache` the
result is looked up first by the media's content, the checkpoint and the preprocessing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from longva_cli import media as media_io
from longva_cli.defaults import FRAMES, VISION_BATCH
from longva_cli.engine.objectives import Notice
from longva_cli.engine.sequence import Visual, identity_of
from longva_cli.engine.visual_cache import DamagedEntry, VisualCache, content_hash
from longva_cli.errors import LongVAError
from longva_cli.model.processing import preprocess, unires_crops

if TYPE_CHECKING:
    from longva_cli.model.config import ImageProcessing
    from longva_cli.model.longva import LoadedLongVA

INFO_FILE = "info.json"  # in a visual cache entry: kind, count, frame ids and crop grid of its frames


@dataclass(frozen=True, eq=False)
class MediaSpec:
    """One media item and how to sample it.

    A video gives `frames` frames spread uniformly (32 when both are None), or `fps` frames a
    second with `frames` as a cap. An image is cut into UniRes crops. `pad_to_square` pads each
    frame to a square of the CLIP mean colour first (V-NIAH's haystack and needles).
    """

    source: Path | Image.Image
    frames: int | None = None
    fps: float | None = None
    pad_to_square: bool = False

    def describe(self) -> dict:
        """The sampling and preprocessing settings, as part of a cache key."""
        return {"frames": self.frames, "fps": self.fps, "pad_to_square": self.pad_to_square}


@dataclass
class Encoding:
    """Progress event: images (frames or crops) encoded so far."""

    done: int
    total: int


def media_kind(source: Path | Image.Image) -> str:
    """'image' or 'video' by the file's content; raises a LongVAError for anything else."""
    if isinstance(source, Image.Image):
        return "image"
    path = media_io.check_file(Path(source))
    if media_io.open_image(path) is not None:
        return "image"
    media_io.open_video(path)
    return "video"


def content_of(source: Path | Image.Image, cache: VisualCache | None = None) -> str:
    """What a media item holds, as a SHA-256 (of all of a file's bytes, or an image's pixels);
    `cache` remembers a large file's hash between runs."""
    if isinstance(source, Image.Image):
        digest = hashlib.sha256(f"{source.mode}{source.size}".encode())
        digest.update(source.tobytes())
        return digest.hexdigest()
    path = media_io.check_file(Path(source))
    return cache.file_hash(path) if cache is not None else content_hash(path)


# ---- pixels ------------------------------------------------------------------------------------


@dataclass
class Pixels:
    """A media item's pixels, in batches, and what they are."""

    kind: str  # "video" or "image"
    count: int  # frames or crops
    batches: Iterator[torch.Tensor]  # float32 [b, 3, 336, 336], `count` rows in all
    frame_ids: list[int]
    grid: tuple[int, int] | None = None
    seconds: float | None = None  # a video's length
    rate_frames: int | None = None  # frames the fps alone asks for (more than `count` when capped)


def frame_ids(video: media_io.Video, spec: MediaSpec) -> list[int]:
    if spec.fps is not None:
        return media_io.frame_ids_at_fps(video.num_frames, video.fps, spec.fps, max_frames=spec.frames)
    return media_io.uniform_frame_ids(video.num_frames, spec.frames or FRAMES)


def pixels(spec: MediaSpec, processing: "ImageProcessing", pinpoints, batch: int = VISION_BATCH) -> Pixels:
    """Sample and preprocess a media item, lazily: frames are decoded a few at a time and only
    their 336-px crops accumulate, whatever the video's frame size."""
    source = spec.source
    image = source if isinstance(source, Image.Image) else media_io.open_image(media_io.check_file(Path(source)))
    if image is not None:
        crops, grid = unires_crops(image, processing, pinpoints)
        batches = (preprocess(crops[i : i + batch], processing) for i in range(0, len(crops), batch))
        return Pixels("image", len(crops), batches, [], grid)
    video = media_io.open_video(Path(source))
    ids = frame_ids(video, spec)
    batches = video.pixel_batches(ids, processing, batch_size=batch, pad_to_square=spec.pad_to_square)
    return Pixels("video", len(ids), batches, ids, seconds=video.num_frames / video.fps, rate_frames=rate_frames(video, spec))


def rate_frames(video: media_io.Video, spec: MediaSpec) -> int | None:
    """How many frames `--fps` alone would take (None when sampling by count)."""
    if spec.fps is None:
        return None
    return len(media_io.frame_ids_at_fps(video.num_frames, video.fps, spec.fps))


def media_pixels(spec: MediaSpec, processing: "ImageProcessing", pinpoints) -> torch.Tensor:
    """All pixels of a media item at once, [n, 3, 336, 336] (training samples are short)."""
    return torch.cat(list(pixels(spec, processing, pinpoints).batches))


# ---- tokens ------------------------------------------------------------------------------------


def embeddings_home(model: "LoadedLongVA", on_host: bool) -> torch.device:
    """Where a media item's visual embeddings are kept: the model's device, or host memory."""
    return torch.device("cpu") if on_host else model.model.device


def kept(model: "LoadedLongVA", embeds: torch.Tensor, on_host: bool) -> torch.Tensor:
    """`embeds` where the run keeps them: on the model's device, or in host memory, pinned beside
    a GPU so that each prefill chunk copies from there fast."""
    embeds = embeds.to(embeddings_home(model, on_host))
    return embeds.pin_memory() if on_host and model.model.device.type == "cuda" else embeds


def restore_vision_tower(model: "LoadedLongVA") -> None:
    """Bring a released vision tower and projector back to the language model's device."""
    network = model.model
    if network.device.type == "cuda" and next(network.vision_tower.parameters()).device != network.device:
        network.vision_tower.to(network.device)
        network.mm_projector.to(network.device)


def release_vision_tower(model: "LoadedLongVA") -> None:
    """Move the vision tower and projector to host memory, where they wait for the next media."""
    network = model.model
    if network.device.type == "cuda" and next(network.vision_tower.parameters()).device.type == "cuda":
        network.vision_tower.to("cpu")
        network.mm_projector.to("cpu")
        torch.cuda.empty_cache()


@torch.inference_mode()
def encode_batches(
    model: "LoadedLongVA", batches, count: int, pad_to_square: bool = False, on_host: bool = False
) -> Generator[Encoding, None, torch.Tensor]:
    """[b, h, w, 3] uint8 frame batches or preprocessed [b, 3, 336, 336] pixel batches (`count`
    rows in all) -> [count, 144, d]; one batch of pixels in memory at a time. With `on_host`
    the result is kept in host memory, pinned beside a GPU so each prefill chunk copies fast."""
    tokens = model.model.tokens_per_image
    pin = on_host and model.model.device.type == "cuda"
    out = torch.empty(
        (count, tokens, model.model.config.hidden_size), dtype=model.model.dtype, device=embeddings_home(model, on_host), pin_memory=pin
    )
    filled = 0
    for batch in batches:
        if not isinstance(batch, torch.Tensor) or batch.dtype == torch.uint8:
            batch = preprocess(list(batch), model.processing, pad_to_square=pad_to_square)  # [b, 3, 336, 336]
        out[filled : filled + len(batch)] = model.model.encode_pixels(batch)
        filled += len(batch)
        yield Encoding(filled, count)
    return out


def check_memory(model: "LoadedLongVA", images: int, on_host: bool = False) -> None:
    """Refuse a frame count whose visual tokens (unless kept on the host) and KV cache exceed the
    device's whole memory, before anything is allocated (`memory.check_fits` warns about what may
    not fit right now; `plan.plan_for` plans the whole run before loading)."""
    from longva_cli.engine.memory import kv_bytes_per_token, total_memory
    from longva_cli.model.kv_cache import kv_storage_of

    tokens = images * model.model.tokens_per_image
    element = torch.tensor([], dtype=model.model.dtype).element_size()
    embeddings = 0 if on_host else model.model.config.hidden_size * element
    need = tokens * (embeddings + kv_bytes_per_token(model.model.config, kv_storage_of(model.model.language_model)))
    have = total_memory(model.model.device)
    if need > have:
        raise LongVAError(
            f"{images:,} frames are {tokens:,} visual tokens, which need about {need / 2**30:,.1f} GiB for their "
            f"embeddings and KV cache, more than the {have / 2**30:,.1f} GiB {model.model.device} has; ask for fewer frames."
        )


def cache_key(model: "LoadedLongVA", spec: MediaSpec, content: str) -> dict:
    return {
        "content": content,
        "model": model.fingerprint,
        "dtype": str(model.model.dtype),
        "tokens": model.model.tokens_per_image,
        **spec.describe(),
    }


def encode(
    model: "LoadedLongVA", spec: MediaSpec, cache: VisualCache | None = None, on_host: bool = False
) -> Generator[Encoding | Notice, None, Visual]:
    """The visual tokens of one media item, from `cache` when it has them; with `on_host` they
    are kept in host memory and reach the device one prefill chunk at a time (`sequence.build`)."""
    if spec.frames is not None and spec.fps is None:
        check_memory(model, spec.frames, on_host)
    usable = cache is not None and model.fingerprint is not None
    content = content_of(spec.source, cache if usable else None)
    key = cache_key(model, spec, content)
    identity = identity_of(json.dumps(key, sort_keys=True))
    if usable:
        try:
            found = cache.remembered(key) or from_disk(cache, key, model, embeddings_home(model, on_host))
        except DamagedEntry as err:
            yield Notice(str(err) + ".")
            found = None
        if found is not None:
            embeds, info = found
            embeds = kept(model, embeds, on_host)
            cache.remember(key, found, embeds.numel() * embeds.element_size())
            return Visual(embeds.flatten(0, 1), info["kind"], info["images"], info["frame_ids"], tuple(info["grid"]) if info["grid"] else None, identity)
    if on_host:
        restore_vision_tower(model)  # an earlier item's encoding released it: encoding on the host would be far slower
    source = pixels(spec, model.processing, model.model.mm.image_grid_pinpoints)
    if source.kind == "video" and spec.fps is not None:
        check_memory(model, source.count, on_host)
        if source.rate_frames > source.count:
            yield Notice(
                f"--fps {spec.fps:g} would take {source.rate_frames:,} frames; took {source.count:,} (--frames) spread over "
                f"the whole video (0-{source.seconds:.1f} s)."
            )
    embeds = yield from encode_batches(model, source.batches, source.count, on_host=on_host)  # [n, 144, d]
    info = {"kind": source.kind, "images": source.count, "frame_ids": source.frame_ids, "grid": source.grid}
    if usable:
        cache.remember(key, (embeds, info), embeds.numel() * embeds.element_size())
        problem = store_on_disk(cache, key, embeds, info)
        if problem:
            yield Notice(problem)
    return Visual(embeds.flatten(0, 1), source.kind, source.count, source.frame_ids, source.grid, identity)


def store_on_disk(cache: VisualCache, key: dict, embeds: torch.Tensor, info: dict) -> str | None:
    """Write a fresh encoding to the disk cache; a failed write (a full disk, a read-only folder)
    leaves nothing behind and is said in one line, and the answer goes on without the cache."""
    from safetensors import SafetensorError

    from longva_cli.engine.runs import write_atomic

    entry = cache.entry(key)
    if entry is None:
        return None
    try:
        entry.append(0, embeds)
        write_atomic(entry.folder / INFO_FILE, json.dumps(info) + "\n")
        cache.evict(keep=entry)
    except (OSError, SafetensorError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
        return f"could not write the visual cache in {cache.folder} ({reason}); this answer is computed without it."
    return None


def from_disk(cache: VisualCache, key: dict, model: "LoadedLongVA", device: torch.device) -> tuple[torch.Tensor, dict] | None:
    """The stored encoding of `key`, or None; DamagedEntry when a stored block fails its checksum."""
    entry = cache.entry(key)
    if entry is None or not (entry.folder / INFO_FILE).is_file():
        return None
    try:
        info = json.loads((entry.folder / INFO_FILE).read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not isinstance(info.get("images"), int) or info.get("kind") not in ("video", "image"):
        return None
    embeds = entry.load(info["images"], device)
    if embeds is None:
        return None
    return embeds.to(model.model.dtype), info
