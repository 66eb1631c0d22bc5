"""The memory plan of a run, from the checkpoint's config.json alone: no weights, no device.

    shape = ModelShape.from_folder(folder)                      # config files only
    plan = plan_run(shape, Workload(frames=3000), budget=24 * 2**30, device_type="cuda", dtype_label="bf16")
    plan.chosen      # the estimate of the first settings of the ladder that fit, or None
    plan.largest     # the most frames each setting fits in the budget

`plan_for` does the same for a command's flags (`ask`, `chat`, `eval local`, `serve`), `fit_budget`
turns its choice into the settings a run loads with (or refuses the run), and `plan_table` shows it.

A run's peak on the device is the larger of its two phases:

    encoding   weights + vision tower + visual embeddings + one batch of tower activations
    prefill    weights + KV cache + visual embeddings + one prefill chunk's activations
               (+ the vision tower unless released, - the visual embeddings when on the host)

Parameter counts come from building the model on PyTorch's meta device (shapes, no storage), so
they are exact for any config. Activations are counted tensor by tensor as the decoder makes
them: the largest moment of a chunk is either the MLP (gate, up and their product, [chunk,
intermediate] each) or the attention (the chunk's queries, keys and values and their rotated
copies, plus one layer's cached keys, then values, held a second time). The KV cache is reserved
whole and written in place (model/kv_cache.py), but attention reads it through a view that a
kernel may copy to contiguous memory: measured on CPU (tests/engine/test_plan.py), and counted on every
device so the plan errs high until a GPU has measured it.

Settings are tried in the order of what they cost the answer: the model's own dtype first, then
an fp8 KV cache, then visual tokens in host memory (moved to the device chunk by chunk, the
tower moved off the device once the frames are encoded), then 4-bit weights.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

from longva_cli.defaults import FRAMES, MAX_NEW_TOKENS, PREFILL_CHUNK, VISION_BATCH
from longva_cli.errors import LongVAError

GIB = 2**30

# KV-cache storages the running engine can execute besides the model's own dtype: fp8 is
# model/kv_cache.py's Float8KVLayer (`--kv-cache fp8`).
KV_CACHE_LOW_PRECISION: tuple[str, ...] = ("fp8",)

FP8_SCALE_BYTES = 4  # one float32 scale per token and KV head, for keys and for values
# Quantised linear weights, bytes per weight: int8 with a float32 scale per output row is
# counted per row below; 4-bit is half a byte plus a 4-byte scale per block of 64 (bitsandbytes
# nf4; torchao's int4, groups of 128 with a bf16 scale and zero, is slightly smaller: the plan
# errs high by 0.2 GB on a 7B).
FOUR_BIT_BYTES_PER_WEIGHT = 0.5 + 4 / 64
# Tokens allowed for the system prompt, questions and chat turns: the plan is made before they
# are all known (a chat's later turns), and text is a rounding error beside 144 tokens a frame.
TEXT_ALLOWANCE = 1024
DTYPE_LABELS = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}

_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)\s*", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def shown(size: int) -> str:
    """A byte count for a sentence: GiB with two decimals, or MiB below one GiB."""
    return f"{size / GIB:,.2f} GiB" if size >= GIB else f"{size / 2**20:,.0f} MiB"


def parse_size(text: str, name: str = "--memory-budget") -> int:
    """Bytes in '24GiB', '24GB', '24000MiB' or '1.5TB'; a LongVAError naming `name` otherwise."""
    match = _SIZE.fullmatch(text or "")
    size = float(match.group(1)) * _UNITS[match.group(2).lower()] if match else 0
    if not size:
        raise LongVAError(f"{name} {text!r} is not a memory size; write a positive number and a unit, e.g. 24GiB, 24GB or 24000MiB.")
    return int(size)


@dataclass(frozen=True)
class Settings:
    """How a run holds its parts: weight format, KV storage, and where the visual tokens and tower live."""

    weights: str  # the model dtype's label (bf16, fp32...), "8bit" or "4bit"
    kv_cache: str  # the model dtype's label, or "fp8"
    visual_tokens: str = "device"  # or "host": pinned host memory, moved per prefill chunk
    vision_tower: str = "resident"  # or "released": moved off the device after encoding

    @property
    def quantize(self) -> str | None:
        """The loader's `quantize` for these weights."""
        return self.weights if self.weights in ("8bit", "4bit") else None

    def describe(self) -> str:
        visual = "visual tokens in host memory, tower released" if self.visual_tokens == "host" else "visual tokens on the device"
        return f"{self.weights} weights, {self.kv_cache} KV cache, {visual}"


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a checkpoint, read from its config files."""

    language: object  # transformers Qwen2Config
    vision: object  # transformers CLIPVisionConfig
    mm: object  # MultimodalConfig

    @classmethod
    def from_folder(cls, folder: Path) -> "ModelShape":
        from longva_cli.model.config import language_config, multimodal_config, read_config, vision_settings

        raw = read_config(Path(folder))
        mm = multimodal_config(raw, Path(folder) / "config.json")
        return cls(language_config(raw, Path(folder) / "config.json"), vision_settings(mm)[0], mm)

    @cached_property
    def counts(self) -> dict[str, int]:
        """Parameters by part, counted on a model built on the meta device (no storage)."""
        import torch

        from longva_cli.model.checkpoint import build_longva

        with torch.device("meta"):
            model = build_longva(self.language, self.vision, self.mm)
        layers = model.language_model.model.layers
        linear = [m for m in layers.modules() if isinstance(m, torch.nn.Linear)]
        return {
            "language": sum(p.numel() for p in model.language_model.parameters()),
            "quantizable": sum(m.weight.numel() for m in linear),  # what bitsandbytes and torchao convert
            "quantized_rows": sum(m.out_features for m in linear),
            "vision": sum(p.numel() for p in model.vision_tower.parameters()) + sum(p.numel() for p in model.mm_projector.parameters()),
        }

    @property
    def tokens_per_image(self) -> int:
        side = self.vision.image_size // self.vision.patch_size
        pooled = -(-side // self.mm.pool_stride)
        return pooled * pooled

    @property
    def head_dim(self) -> int:
        config = self.language
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@dataclass(frozen=True)
class Workload:
    """What a run asks for: frames, text and answer tokens, the prefill chunk and the model dtype's size."""

    frames: int
    text_tokens: int = TEXT_ALLOWANCE
    new_tokens: int = MAX_NEW_TOKENS
    chunk: int = PREFILL_CHUNK
    element: int = 2  # bytes of the model dtype
    device_type: str = "cuda"

    def tokens(self, shape: ModelShape) -> int:
        return self.frames * shape.tokens_per_image + self.text_tokens + self.new_tokens


@dataclass
class Estimate:
    """Bytes of each part on the device under `settings`, and the peak."""

    settings: Settings
    parts: dict[str, int]  # part -> bytes on the device
    encoding_peak: int
    prefill_peak: int  # prefill and decoding
    host: int = 0  # bytes kept in host memory (visual tokens, a released tower)

    @property
    def peak(self) -> int:
        return max(self.encoding_peak, self.prefill_peak)

    def describe(self, budget: int | None = None) -> str:
        within = f" of the {shown(budget)} budget" if budget else ""
        return f"{self.settings.describe()}: about {shown(self.peak)} at the peak{within}"


def weight_bytes(shape: ModelShape, weights: str, element: int) -> int:
    counts = shape.counts
    rest = (counts["language"] - counts["quantizable"]) * element  # embeddings, lm_head, norms, biases
    if weights == "8bit":
        return rest + counts["quantizable"] + 4 * counts["quantized_rows"]
    if weights == "4bit":
        return rest + math.ceil(counts["quantizable"] * FOUR_BIT_BYTES_PER_WEIGHT)
    return counts["language"] * element


def kv_bytes(shape: ModelShape, tokens: int, storage: str, element: int) -> int:
    """Keys and values of `tokens` positions in every layer; fp8 adds a scale per token and head."""
    config = shape.language
    heads = 2 * config.num_hidden_layers * config.num_key_value_heads  # keys and values
    per_head = shape.head_dim + FP8_SCALE_BYTES if storage == "fp8" else shape.head_dim * element
    return tokens * heads * per_head


def prefill_activation_bytes(shape: ModelShape, work: Workload, kv_cache: str) -> int:
    """The largest transient of one decoder layer on one chunk: its MLP, or its attention with the
    KV append (see the module docstring)."""
    config, e = shape.language, work.element
    c = min(work.chunk, work.tokens(shape))  # a short prompt is one chunk
    d, inner = config.hidden_size, config.intermediate_size
    q_width = config.num_attention_heads * shape.head_dim
    kv_width = config.num_key_value_heads * shape.head_dim
    carried = 3 * c * d * e  # the chunk's embeddings, the residual stream and its normed copy
    mlp = 3 * c * inner * e  # gate activation, up projection and their product
    attention = c * (2 * q_width + 4 * kv_width) * e  # q, k, v and their rotated copies
    attention += kv_bytes(shape, work.tokens(shape), kv_cache, e) // (2 * config.num_hidden_layers)  # a copy of the cache's view
    return carried + max(mlp, attention)


def encoding_activation_bytes(shape: ModelShape, work: Workload) -> int:
    """One batch through the tower (every hidden state is kept for the selected layer), the
    projector and the pool, plus its pixels. Measured on CPU (tests/engine/test_plan.py): a batch's
    pixels exist twice while the tower runs, and from the second batch on the video reader still
    holds the previous one; on a GPU the float32 pixels stay in host memory and the device holds
    the batch's copies in the model dtype."""
    vision, e = shape.vision, work.element
    batch = min(VISION_BATCH, max(work.frames, 1))
    positions = (vision.image_size // vision.patch_size) ** 2 + 1  # patches + CLS
    tower = batch * positions * ((vision.num_hidden_layers + 1) * vision.hidden_size + 2 * vision.intermediate_size) * e
    projector = 2 * batch * (positions - 1) * shape.language.hidden_size * e
    pixel_values = batch * 3 * vision.image_size**2
    if work.device_type == "cpu":
        batches_held = 3 if work.frames > VISION_BATCH else 2
        pixels = batches_held * pixel_values * 4 + (pixel_values * e if e != 4 else 0)
    else:
        pixels = 2 * pixel_values * e
    return tower + projector + pixels


def estimate(shape: ModelShape, settings: Settings, work: Workload) -> Estimate:
    e = work.element
    weights = weight_bytes(shape, settings.weights, e)
    tower = shape.counts["vision"] * e
    visual = work.frames * shape.tokens_per_image * shape.language.hidden_size * e
    kv = kv_bytes(shape, work.tokens(shape), settings.kv_cache, e)
    visual_on_device = 0 if settings.visual_tokens == "host" else visual
    encoding = weights + tower + visual_on_device + encoding_activation_bytes(shape, work)
    released = settings.vision_tower == "released"
    prefill_activations = prefill_activation_bytes(shape, work, settings.kv_cache)
    prefill = weights + (0 if released else tower) + visual_on_device + kv + prefill_activations
    parts = {
        "language-model weights": weights,
        "vision tower and projector": tower,
        "visual embeddings": visual_on_device,
        "KV cache": kv,
        "activations (prefill chunk)": prefill_activations,
        "activations (encoding batch)": encoding_activation_bytes(shape, work),
    }
    host = (visual if settings.visual_tokens == "host" else 0) + (tower if released else 0)
    return Estimate(settings, parts, encoding, prefill, host)


def ladder(
    dtype_label: str, device_type: str, quantize: str | None = None, low_precision_kv=None, kv_cache: str = "auto"
) -> list[Settings]:
    """The settings to try, cheapest in quality first; each step keeps the savings before it.

    `quantize` and a `kv_cache` other than auto fix the weights and the KV storage (the user
    asked for them); 4-bit is offered only on CUDA, where its kernels run; host visual tokens
    only off the CPU (on a CPU they are host memory already).
    """
    kv_options = KV_CACHE_LOW_PRECISION if low_precision_kv is None else low_precision_kv
    weights = quantize or dtype_label
    steps = [Settings(weights, dtype_label if kv_cache == "auto" else kv_cache)]
    if kv_cache == "auto" and "fp8" in kv_options:
        steps.append(replace(steps[-1], kv_cache="fp8"))
    if device_type == "cuda":
        steps.append(replace(steps[-1], visual_tokens="host", vision_tower="released"))
        if quantize is None:
            steps.append(replace(steps[-1], weights="4bit"))
    return steps


def largest_frames(shape: ModelShape, settings: Settings, work: Workload, budget: int, most: int = 1 << 16) -> int:
    """The most frames whose peak fits `budget` under `settings` (0 when not even one does)."""
    fits = lambda frames: estimate(shape, settings, replace(work, frames=frames)).peak <= budget  # noqa: E731
    low, high = 0, most
    while low < high:  # the peak grows with the frames: bisect for the last count that fits
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


@dataclass
class Plan:
    """Each setting's estimate for the asked work, the first that fits, and the most frames each fits."""

    work: Workload
    budget: int
    device_type: str
    estimates: list[Estimate]
    largest: dict[Settings, int] = field(default_factory=dict)

    @property
    def chosen(self) -> Estimate | None:
        return next((e for e in self.estimates if e.peak <= self.budget), None)

    def refusal(self, frames_flag: str = "--frames") -> str:
        """The sentence that refuses a run nothing fits, naming the most frames that would (as
        `frames_flag`, the command's flag for them)."""
        most = max(self.largest.values())
        leanest = min(self.estimates, key=lambda e: e.peak)
        advice = f"ask for fewer frames (at most {most:,} fit: {frames_flag} {most}) or raise --memory-budget" if most else (
            "not even one frame fits; raise --memory-budget"
        )
        return (
            f"{self.work.frames:,} frames need about {shown(leanest.peak)} even with {leanest.settings.describe()}, "
            f"more than the {shown(self.budget)} budget; {advice}."
        )

    def stderr_line(self) -> str:
        chosen = self.chosen
        return f"Memory plan for {self.work.frames:,} frames on {self.device_type}: {chosen.describe(self.budget)}."


def plan_run(
    shape: ModelShape, work: Workload, budget: int, device_type: str, dtype_label: str, quantize: str | None = None,
    low_precision_kv=None, kv_cache: str = "auto",
) -> Plan:
    steps = ladder(dtype_label, device_type, quantize, low_precision_kv, kv_cache)
    plan = Plan(work, budget, device_type, [estimate(shape, s, work) for s in steps])
    plan.largest = {s: largest_frames(shape, s, work, budget) for s in steps}
    return plan


def plan_table(plan: Plan):
    """Two rich tables: each part's GiB under each setting, then the settings (numbered as the
    first table's columns) with their peak, the most frames that fit, and the chosen one; then
    the line a run would print, or the sentence that would refuse it."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts = Table(title=f"Memory plan: {plan.work.frames:,} frames on {plan.device_type}, budget {plan.budget / GIB:,.1f} GiB")
    parts.add_column("part (GiB)")
    for number in range(1, len(plan.estimates) + 1):
        parts.add_column(f"setting {number}", justify="right")
    for part in plan.estimates[0].parts:
        parts.add_row(part, *(f"{e.parts[part] / GIB:,.2f}" for e in plan.estimates))
    parts.add_row("peak on the device", *(f"{e.peak / GIB:,.2f}" for e in plan.estimates), style="bold")
    parts.add_row("held in host memory", *(f"{e.host / GIB:,.2f}" for e in plan.estimates))

    settings = Table(title="Settings, tried in this order (max frames: the most that fit the budget)")
    for column in ("#", "weights", "KV", "visual", "tower", "peak GiB", "max frames", "chosen"):
        settings.add_column(column, justify="right" if column in ("peak GiB", "max frames") else "left")
    chosen = plan.chosen
    for number, e in enumerate(plan.estimates, 1):
        s = e.settings
        settings.add_row(
            str(number), s.weights, s.kv_cache, s.visual_tokens, s.vision_tower, f"{e.peak / GIB:,.2f}",
            f"{plan.largest[s]:,}", "yes" if e is chosen else "",
        )
    verdict = plan.stderr_line() if chosen is not None else plan.refusal()
    return Group(parts, settings, Text(verdict))


def media_images(media: Path, frames: int | None, fps: float | None, shape: ModelShape) -> int:
    """Frames (or UniRes crops) the encoder will take from `media`, without decoding any."""
    from longva_cli import media as media_io
    from longva_cli.engine.encoder import MediaSpec, frame_ids
    from longva_cli.model.processing import select_best_resolution

    image = media_io.open_image(media_io.check_file(Path(media)))
    if image is not None:
        width, height = select_best_resolution(image.size, shape.mm.image_grid_pinpoints)
        crop = shape.vision.image_size  # UniRes cuts the canvas into tower-sized crops
        return (width // crop) * (height // crop)
    if fps is None:
        return frames or FRAMES
    return len(frame_ids(media_io.open_video(Path(media)), MediaSpec(Path(media), frames, fps)))


def planned_device(device: str):
    """The device a plan is for: read, never opened, so "cuda" plans for a GPU on a machine without one."""
    import torch

    from longva_cli.engine.loader import resolve_device

    if device.startswith("cuda") and not torch.cuda.is_available():
        try:
            return torch.device(device)
        except RuntimeError:
            pass
    return resolve_device(device)  # here, or a one-sentence error


def plan_for(
    model: str, media: Path | None, *, max_new_tokens: int, prefill_chunk: int, device: str, dtype: str, quantize: str | None,
    budget: str | None, frames: int | None = None, fps: float | None = None, images: int = 0, revision: str | None = None,
    only_planning: bool = False, kv_cache: str = "auto", kept_aside: int = 0,
) -> Plan:
    """The plan of a run, from the checkpoint's config files and the media's header.

    The frames come from `media` sampled by `frames` and `fps` (`ask`, `chat`), or are `images`
    when there is no one file to read them from (`eval local`'s --frames for each video, `serve`'s
    --max-frames for its largest request). `only_planning` (`--plan`) plans for `device` without
    opening it, and downloads nothing. Without `budget`, the device's free memory is the budget
    (the device must then be here). `kept_aside` bytes of it are not the run's (`serve`'s cache of
    recent requests, `--cache-gb`, which lives on the same device).
    """
    import torch

    from longva_cli.engine.loader import resolve_device, resolve_dtype
    from longva_cli.engine.memory import available_memory
    from longva_cli.hub import locate_model

    target = planned_device(device) if only_planning else resolve_device(device)
    if budget is not None:
        budget_bytes = parse_size(budget)
    elif target.type == "cuda" and not torch.cuda.is_available():
        raise LongVAError("planning for cuda on a machine without a GPU needs that GPU's memory: give --memory-budget, e.g. 24GiB.")
    else:
        budget_bytes = available_memory(target)
    if kept_aside >= budget_bytes:
        raise LongVAError(
            f"the cache of recent requests (--cache-gb, {shown(kept_aside)}) takes the whole {shown(budget_bytes)} memory budget; "
            "lower --cache-gb or raise --memory-budget."
        )
    budget_bytes -= kept_aside
    torch_dtype = resolve_dtype(dtype, target)
    folder = locate_model(model, revision=revision, allow_download=not only_planning, kind="causal-lm" if only_planning else "longva")
    shape = ModelShape.from_folder(folder)
    if media is not None:
        images = media_images(media, frames, fps, shape)
    work = Workload(
        images, text_tokens=TEXT_ALLOWANCE, new_tokens=max_new_tokens, chunk=prefill_chunk,
        element=torch.tensor([], dtype=torch_dtype).element_size(), device_type=target.type,
    )
    return plan_run(shape, work, budget_bytes, target.type, DTYPE_LABELS[str(torch_dtype)], quantize, kv_cache=kv_cache)


@dataclass(frozen=True)
class Fitted:
    """What a run loads and encodes with: the loader's `quantize` and `kv_cache`, and whether the
    visual tokens stay in host memory (`encode_media`'s `on_host`, which also releases the tower)."""

    quantize: str | None
    kv_cache: str
    visual_tokens_on_host: bool = False


def fit_budget(
    plan_of: Callable[[], Plan], say: Callable[[str], None], *, quantize: str | None, kv_cache: str,
    device_map: str | None = None, frames_flag: str = "--frames",
) -> Fitted:
    """The cheapest settings whose planned peak fits the budget, said in one line through `say`
    before anything loads; a LongVAError naming the most frames that fit (as `frames_flag`) when
    none does. `plan_of` makes the plan (`plan_for` with the command's flags). With a `device_map`
    the flags as given: a model split over GPUs has no one device to plan for."""
    if device_map is not None:
        return Fitted(quantize, kv_cache)
    plan = plan_of()
    if plan.chosen is None:
        raise LongVAError(plan.refusal(frames_flag))
    say(plan.stderr_line())
    chosen = plan.chosen.settings
    # The ladder names the model's dtype (bf16, fp32...) where the loader's "auto" means the same.
    return Fitted(chosen.quantize, "fp8" if chosen.kv_cache == "fp8" else kv_cache, chosen.visual_tokens == "host")


# The rows of README's "Long videos" table: what runs today, then with the fp8 KV cache.
TABLE_SETTINGS = [
    Settings("bf16", "bf16"),
    Settings("bf16", "bf16", "host", "released"),
    Settings("4bit", "bf16", "host", "released"),
    Settings("bf16", "fp8"),
    Settings("bf16", "fp8", "host", "released"),
    Settings("4bit", "fp8", "host", "released"),
]


def frames_table(shape: ModelShape, budgets_gib: list[float], chunk: int = PREFILL_CHUNK) -> str:
    """A markdown table of the most frames each of `TABLE_SETTINGS` fits in each budget (GiB) on a
    GPU, with a prompt of `TEXT_ALLOWANCE` tokens and an answer of 1,024."""
    work = Workload(1, text_tokens=TEXT_ALLOWANCE, new_tokens=MAX_NEW_TOKENS, chunk=chunk, element=2, device_type="cuda")
    lines = [
        "| weights | KV cache | visual tokens, tower | " + " | ".join(f"{b:g} GiB" for b in budgets_gib) + " |",
        "|---|---|---|" + "---:|" * len(budgets_gib),
    ]
    for settings in TABLE_SETTINGS:
        where = "host, released" if settings.visual_tokens == "host" else "device, resident"
        frames = [largest_frames(shape, settings, work, int(budget * GIB)) for budget in budgets_gib]
        lines.append(f"| {settings.weights} | {settings.kv_cache} | {where} | " + " | ".join(f"{f:,}" for f in frames) + " |")
    return "\n".join(lines)
