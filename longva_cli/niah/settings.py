"""Settings of a NIAH run (also the schema of the `niah/*` recipes) and the grids they span.

A recipe holds one `mode` (video or text) and that mode's section:

    mode: video
    video:
      haystack: movie.mp4
      max_frames: 3000

Command-line flags override the recipe; a run folder stores the result in settings.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

from longva_cli.checks import check_number
from longva_cli.defaults import PREFILL_CHUNK
from longva_cli.errors import LongVAError

Scoring = Literal["teacher-forced", "generate"]


@dataclass
class VideoSettings:
    haystack: Path | None = None  # a long video; sampled at 1 frame a second
    model: str = "lmms-lab/LongVA-7B"
    needles: str = "v_niah_needles"  # the hub data set (`longva download v_niah_needles`) or a folder
    output: Path = Path("runs/niah-video")
    min_frames: int = 200
    max_frames: int = 3000
    frame_step: int = 200
    depth_step: float = 0.2
    scoring: Scoring = "teacher-forced"
    max_new_tokens: int = 32  # generate scoring only
    cache_dir: Path | None = None  # haystack embeddings (the visual cache); default ~/.cache/longva/visual
    device: str = "auto"
    device_map: str | None = None  # "auto": one sequence's layers and KV cache spread over the GPUs
    sequence_parallel: int = 1  # >1: each sequence split over this many torchrun ranks (Ulysses)
    dtype: str = "auto"
    attn: str = "auto"
    kv_cache: str = "auto"  # auto (the model's dtype), bf16 or fp8: it moves scores a little, so it is part of the identity
    prefill_chunk: int = PREFILL_CHUNK
    memory_budget: str | None = None  # e.g. 24GiB; default the device's free memory (the plan's KV choice is in the identity)


@dataclass
class TextSettings:
    haystack: str = "synthetic"  # a folder of .txt files, or the built-in filler
    model: str = "lmms-lab/Qwen2-7B-Instrcuct-224K"
    output: Path = Path("runs/niah-text")
    min_tokens: int = 32_000
    max_tokens: int = 512_000
    token_step: int = 32_000
    depth_step: float = 0.1
    samples: int = 5  # needle numbers per cell
    distractors: int = 0  # 0..6 other cities' numbers at random places
    seed: int = 2024
    scoring: Scoring = "teacher-forced"
    max_new_tokens: int = 32
    device: str = "auto"
    device_map: str | None = None
    sequence_parallel: int = 1
    dtype: str = "auto"
    attn: str = "auto"
    kv_cache: str = "auto"  # auto (the model's dtype), bf16 or fp8: it moves scores a little, so it is part of the identity
    prefill_chunk: int = PREFILL_CHUNK


@dataclass
class NiahRecipe:
    mode: Literal["video", "text"] = "video"
    video: VideoSettings = field(default_factory=VideoSettings)
    text: TextSettings = field(default_factory=TextSettings)


# Settings that do not change a single score: a run may continue with other values of these.
RUNTIME_FIELDS = {"output", "cache_dir", "device", "device_map", "sequence_parallel", "attn", "prefill_chunk", "memory_budget"}


def identity(settings: VideoSettings | TextSettings) -> dict:
    """The settings that decide the results, as plain JSON values (compared on resume)."""
    values = {}
    for item in fields(settings):
        if item.name in RUNTIME_FIELDS:
            continue
        value = getattr(settings, item.name)
        values[item.name] = str(value) if isinstance(value, Path) else value
    if settings.scoring == "teacher-forced":
        values.pop("max_new_tokens")
    return values


MAX_SIZES = 10_000  # haystack sizes in one grid: far above any real grid, and a list that still fits memory


def size_grid(low: int, high: int, step: int, what: str) -> list[int]:
    """low, low + step, ... up to high (inclusive), as the original's range(low, high + 1, step)."""
    check_number(f"--{what}-step", step, integer=True, at_least=1)  # (recipe keys: the same with _)
    check_number(f"--min-{what}s", low, integer=True, at_least=1)
    check_number(f"--max-{what}s", high, integer=True, at_least=1)
    if low > high:
        raise LongVAError(f"the smallest {what} count ({low}) is larger than the largest ({high}); swap them.")
    if (high - low) // step + 1 > MAX_SIZES:
        raise LongVAError(
            f"{low} to {high} {what}s in steps of {step} makes {(high - low) // step + 1:,} haystack sizes, more than "
            f"{MAX_SIZES:,}; take a larger step."
        )
    return list(range(low, high + 1, step))


DEPTH_STEPS = (0.1, 0.2, 0.5, 1.0)


def depth_grid(step: float) -> list[float]:
    """0, step, ..., 1. The step must divide 1 into tenths: the outputs label depths in whole tens
    (the original's `round(depth * 100, -1)`), so 0.25 would print 25% as 20%."""
    check_number("--depth-step", step, above=0, at_most=1)
    if not any(abs(step - allowed) < 1e-9 for allowed in DEPTH_STEPS):
        raise LongVAError(f"the depth step {step} does not divide 1 into tenths; use 0.1, 0.2, 0.5 or 1.")
    count = round(1 / step)
    return [round(i / count, 6) for i in range(count + 1)]


def depth_label(depth: float) -> float:
    """The original's "Frame Depth" / "Document Depth": depth * 100 rounded to tens."""
    return round(depth * 100, -1)


def check_video(settings: VideoSettings) -> tuple[list[int], list[float]]:
    """The (frame counts, depths) grid of a run, or a LongVAError naming the bad setting."""
    if settings.haystack is None:
        raise LongVAError("give a haystack video with --haystack (any long video you have, e.g. a film).")
    return video_grid(settings)


def video_grid(settings: VideoSettings) -> tuple[list[int], list[float]]:
    """The (frame counts, depths) grid; every value of the settings checked (the haystack may
    still be missing: a recipe leaves it to --haystack)."""
    sizes = size_grid(settings.min_frames, settings.max_frames, settings.frame_step, "frame")
    _check_common(settings)
    if settings.memory_budget is not None:
        from longva_cli.engine.plan import parse_size

        parse_size(settings.memory_budget)
    return sizes, depth_grid(settings.depth_step)


def check_text(settings: TextSettings) -> tuple[list[int], list[float]]:
    """The (haystack lengths, depths) grid, or a LongVAError naming the bad setting."""
    sizes = size_grid(settings.min_tokens, settings.max_tokens, settings.token_step, "token")
    check_number("--samples", settings.samples, integer=True, at_least=1, at_most=MAX_SIZES)
    check_number("--distractors (one per city)", settings.distractors, integer=True, at_least=0, at_most=6)
    check_number("--seed", settings.seed, integer=True, at_least=0, at_most=2**63 - 1)
    _check_common(settings)
    return sizes, depth_grid(settings.depth_step)


def check(recipe: NiahRecipe) -> None:
    """Every value check of a niah recipe, both sections (what `longva niah` runs on a recipe
    before any work, and `longva recipes validate` too)."""
    video_grid(recipe.video)
    check_text(recipe.text)


def _check_common(settings: VideoSettings | TextSettings) -> None:
    for flag in ("max_new_tokens", "prefill_chunk", "sequence_parallel"):
        check_number(f"--{flag.replace('_', '-')}", getattr(settings, flag), integer=True, at_least=1, at_most=2**31 - 1)
    if settings.sequence_parallel > 1 and settings.scoring != "teacher-forced":
        raise LongVAError("--sequence-parallel scores teacher-forced only; drop --scoring generate or the sequence parallelism.")
    if settings.sequence_parallel > 1 and settings.device_map is not None:
        raise LongVAError("--sequence-parallel and --device-map exclude each other: each rank of a group holds the whole model.")
    from longva_cli.model.kv_cache import check_kv_cache

    check_kv_cache(settings.kv_cache, settings.sequence_parallel)


def size_label(size: int) -> str:
    """Heatmap column labels as in the paper's figures: 200 -> 0.2K, 1200 -> 1.2K, 32000 -> 32K (tiny grids: 6)."""
    return str(size) if size < 100 else f"{size / 1000:g}K"
