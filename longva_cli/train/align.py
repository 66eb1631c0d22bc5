"""`longva align`: vision-text alignment training from YAML recipes (bundled: `align/*`).

The three trainings of LongVA after its text stage, one loop:

- stage 1 (`stage1-projector`): captions in the `plain` template, only the projector learns;
- stage 2 (`stage2-full`): LLaVA-NeXT conversations in `qwen_1_5`, tower + projector + LM,
  images as UniRes crops, videos as uniform frames;
- DPO (`dpo`): preference pairs, policy against a frozen reference.

Every sample goes through the inference encoder (`LongVAForCausalLM.encode_pixels`), so what
the model learns on is exactly what `longva ask` feeds it. DeepSpeed ZeRO, the learning-rate
schedule, the loop, checkpoints and metrics are shared with `extend-text` (`longva_cli.train`); checkpoints
are LongVA hub folders that `longva ask` and the original code load.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional

import typer

from longva_cli import options
from longva_cli.checks import check_number, require_extra, shown_value
from longva_cli.defaults import FRAMES
from longva_cli.errors import LongVAError
from longva_cli.train import loop
from longva_cli.train.settings import (
    LoggingSettings,
    OptimizerSettings,
    ParallelSettings,
    TrainSettings,
    check_optimizer,
    check_parallel,
    check_train,
    resolve_precision,
    torch_dtype,
    warmup_steps,
)

if TYPE_CHECKING:
    from longva_cli.parallel.ranks import ParallelState

PARTS = ("mm_vision_tower", "mm_mlp_adapter", "mm_language_model")
PROJECTOR_FILES = ("mm_projector.bin", "mm_projector.safetensors")

# ---------------------------------------------------------------- recipe schema


@dataclass
class ModelSettings:
    name_or_path: Optional[str] = "lmms-lab/LongVA-7B"  # LongVA checkpoint: folder, hub id or short name
    language_model: Optional[str] = None  # instead: a Qwen2 text model (folder or hub id) + `vision_tower`
    vision_tower: str = "openai/clip-vit-large-patch14-336"  # CLIP tower when starting from `language_model`
    pretrain_mm_mlp_adapter: Optional[Path] = None  # stage-1 projector: mm_projector.bin/.safetensors or its run folder
    fresh_projector: bool = False  # re-initialise the projector (stage 1 from a LongVA checkpoint)
    tunable_parts: str = "mm_vision_tower,mm_mlp_adapter,mm_language_model"  # written as mm_tunable_parts
    image_grid_pinpoints: Any = None  # [[w, h], ...] or "(1x1),...,(7x7)"; null keeps the checkpoint's
    # LongVA's image handling, the one the encoder implements: best-fit grid of 336 crops, crop features only
    image_aspect_ratio: Literal["anyres"] = "anyres"
    mm_patch_merge_type: Literal["unires"] = "unires"
    attn_implementation: str = "auto"


@dataclass
class DataSettings:
    path: Path = Path("data/llava_next.json")  # LLaVA conversations (.json list or .jsonl) or preference JSONL
    image_folder: Optional[Path] = None  # `image` names are relative to this
    video_folder: Optional[Path] = None  # `video` names are relative to this
    template: Literal["qwen_1_5", "plain"] = "qwen_1_5"
    system: Optional[str] = "You are a helpful assistant."
    frames: int = FRAMES  # uniform frames per video, 144 tokens each (as `longva ask` samples them)
    max_length: int = 32768  # tokens per sequence (visual included); longer ones are cut and counted
    group_by_length: bool = True  # batches of samples of similar length (less padding)
    num_workers: int = 4  # DataLoader processes decoding media


@dataclass
class AlignOptimizerSettings(OptimizerSettings):
    # optimizer.lr is the language model's (and every part's without its own rate)
    mm_vision_tower_lr: Optional[float] = None
    mm_projector_lr: Optional[float] = None


@dataclass
class AlignTrainSettings(TrainSettings):
    mode: Literal["sft", "dpo"] = "sft"
    epochs: int = 1  # passes over the data when train.max_steps is null


@dataclass
class DPOSettings:
    beta: float = 0.1
    reference: Literal["model", "precomputed"] = "model"  # frozen copy, or log-probs computed before training


@dataclass
class AlignRecipe:
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    optimizer: AlignOptimizerSettings = field(default_factory=lambda: AlignOptimizerSettings(warmup_ratio=0.03))
    train: AlignTrainSettings = field(
        default_factory=lambda: AlignTrainSettings(micro_batch_size=4, output_dir=Path("runs/align"))
    )
    dpo: DPOSettings = field(default_factory=DPOSettings)
    parallel: ParallelSettings = field(default_factory=ParallelSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)


def tunable_parts(recipe: AlignRecipe) -> list[str]:
    parts = [p.strip() for p in recipe.model.tunable_parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise LongVAError(
            f"model.tunable_parts {recipe.model.tunable_parts!r} must list some of {', '.join(PARTS)} (comma-separated)."
        )
    return parts


MAX_CROPS_A_SIDE = 49  # LongVA's grids go up to 7x7 crops; 49 still allows a 1x49 strip


def check_pinpoints(value: Any) -> None:
    """model.image_grid_pinpoints: null, [[w, h], ...] with whole sizes of 1 to 49 crops of 336
    pixels, or a range string like "(1x1),...,(7x7)" of at most 49 crops a side (checked before
    the range is expanded)."""
    from longva_cli.model.config import parse_pinpoints

    key = "recipe key model.image_grid_pinpoints"
    if value is None:
        return
    if isinstance(value, str):
        for number in re.findall(r"\d+", value):
            check_number(f"{key} (a crop count in {shown_value(value)})", int(number), at_least=1, at_most=MAX_CROPS_A_SIDE)
        parse_pinpoints(value)
        return
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_CROPS_A_SIDE**2:
        raise LongVAError(f"{key} must be a list of up to {MAX_CROPS_A_SIDE**2} [width, height] pairs or a range like (1x1),...,(7x7), got {shown_value(value)}.")
    for i, pair in enumerate(value):
        if not isinstance(pair, list) or len(pair) != 2:
            raise LongVAError(f"{key}[{i}] must be a [width, height] pair, got {shown_value(pair)}.")
        for side in pair:
            check_number(f"{key}[{i}]", side, integer=True, at_least=1, at_most=336 * MAX_CROPS_A_SIDE)


def check(recipe: AlignRecipe) -> None:
    """Every value check of align's settings, before any work (`longva recipes validate` runs
    the same)."""
    tunable_parts(recipe)
    check_optimizer(recipe.optimizer)
    check_number("recipe key optimizer.mm_vision_tower_lr", recipe.optimizer.mm_vision_tower_lr, above=0, nullable=True)
    check_number("recipe key optimizer.mm_projector_lr", recipe.optimizer.mm_projector_lr, above=0, nullable=True)
    check_train(recipe.train)
    check_parallel(recipe.parallel)
    check_number("recipe key dpo.beta", recipe.dpo.beta, above=0)
    for key, value in {"train.epochs": recipe.train.epochs, "data.frames": recipe.data.frames, "data.max_length": recipe.data.max_length}.items():
        check_number(f"recipe key {key}", value, integer=True, at_least=1)
    check_number("recipe key data.num_workers", recipe.data.num_workers, integer=True, at_least=0)
    check_pinpoints(recipe.model.image_grid_pinpoints)
    if (recipe.model.name_or_path is None) == (recipe.model.language_model is None):
        raise LongVAError("set exactly one of model.name_or_path (a LongVA checkpoint) and model.language_model (a text model + model.vision_tower).")
    if recipe.train.mode == "dpo" and recipe.data.template != "qwen_1_5":
        raise LongVAError("train.mode=dpo uses the qwen_1_5 template; set data.template=qwen_1_5.")


# ---------------------------------------------------------------- model


def load_projector_file(path: Path):
    """The projector weights of a stage-1 run: a file, a step folder, or a run folder (its `latest`)."""
    import torch

    path = Path(path).expanduser()
    if path.is_dir() and (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if path.is_dir():
        found = [path / name for name in PROJECTOR_FILES if (path / name).is_file()]
        if not found:
            raise LongVAError(f"{path} holds no {' or '.join(PROJECTOR_FILES)}; point model.pretrain_mm_mlp_adapter at a stage-1 output.")
        path = found[0]
    if not path.is_file():
        raise LongVAError(f"model.pretrain_mm_mlp_adapter {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        weights = load_file(path)
    else:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    # LLaVA's names are `model.mm_projector.0.weight`; keep what follows `mm_projector.`
    return {key.split("mm_projector.", 1)[1]: value for key, value in weights.items() if "mm_projector." in key}


def build_model(recipe: AlignRecipe, dtype, attn_implementation: str):
    """(LongVAForCausalLM, tokenizer, ImageProcessing) from a LongVA checkpoint or a text LM + CLIP."""
    import torch

    from longva_cli.model.config import (
        MultimodalConfig,
        parse_pinpoints,
        vision_settings,
    )
    from longva_cli.model.modeling import LongVAForCausalLM, build_projector

    settings = recipe.model
    if settings.name_or_path is not None:
        from longva_cli.hub import locate_model
        from longva_cli.model.checkpoint import load_longva
        from longva_cli.model.checkpoint import load_tokenizer

        folder = locate_model(settings.name_or_path)
        model = load_longva(folder, dtype=dtype, attn_implementation=attn_implementation)
        tokenizer = load_tokenizer(folder)
        model.mm = replace(model.mm, vision_tower=_portable_tower(model.mm.vision_tower))
    else:
        from transformers import AutoTokenizer, CLIPVisionModel, Qwen2ForCausalLM

        try:
            language_model = Qwen2ForCausalLM.from_pretrained(settings.language_model, dtype=dtype, attn_implementation=attn_implementation)
            tokenizer = AutoTokenizer.from_pretrained(settings.language_model)
            tower = CLIPVisionModel.from_pretrained(settings.vision_tower, dtype=dtype, attn_implementation="sdpa")
        except OSError as err:
            raise LongVAError(
                f"could not load {settings.language_model} or {settings.vision_tower} ({err.__class__.__name__}); "
                "check model.language_model and model.vision_tower, or `longva download` them first."
            ) from None
        mm = MultimodalConfig(vision_tower=_portable_tower(settings.vision_tower), mm_hidden_size=tower.config.hidden_size,
                              tokenizer_model_max_length=recipe.data.max_length)
        torch.manual_seed(recipe.train.seed)
        projector = build_projector(mm, language_model.config.hidden_size).to(dtype)
        model = LongVAForCausalLM(language_model, tower, projector, mm)
    if settings.image_grid_pinpoints is not None:
        model.mm = replace(model.mm, image_grid_pinpoints=parse_pinpoints(settings.image_grid_pinpoints))
    model.mm = replace(
        model.mm,
        tunable_parts=",".join(tunable_parts(recipe)),
        image_aspect_ratio=settings.image_aspect_ratio,
        patch_merge_type=settings.mm_patch_merge_type,
    )
    if settings.fresh_projector:
        torch.manual_seed(recipe.train.seed)
        model.mm_projector = build_projector(model.mm, model.config.hidden_size).to(device=model.device, dtype=dtype)
    if settings.pretrain_mm_mlp_adapter is not None:
        state = load_projector_file(settings.pretrain_mm_mlp_adapter)
        try:
            model.mm_projector.load_state_dict(state, strict=True)
        except RuntimeError:
            raise LongVAError(
                f"{settings.pretrain_mm_mlp_adapter} does not fit this model's projector (keys or shapes differ); was it trained for the same LM and tower?"
            ) from None
    _, processing = vision_settings(model.mm)
    return model, tokenizer, processing


def _portable_tower(name: str) -> str:
    """`mm_vision_tower` as checkpoints should store it: a local folder as an absolute path, so the
    checkpoint loads from any working directory (a hub id stays as it is)."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def set_trainable(model, parts: list[str], lrs: dict[str, float]) -> list[dict[str, Any]]:
    """Freeze what does not train; the optimizer's parameter groups, one per trained part."""
    modules = {"mm_vision_tower": model.vision_tower, "mm_mlp_adapter": model.mm_projector, "mm_language_model": model.language_model}
    groups = []
    for name, module in modules.items():
        module.requires_grad_(name in parts)
        if name in parts:
            groups.append({"params": list(module.parameters()), "lr": lrs[name], "name": name})
    return groups


# ---------------------------------------------------------------- checkpoints


def write_longva_folder(folder: Path, weights: dict, model, tokenizer, projector_file: bool) -> None:
    """A LongVA checkpoint from gathered weights, and for stage 1 also `mm_projector.bin` with
    LLaVA's key names, which stage 2 starts from."""
    import torch

    from longva_cli.model.checkpoint import PROJECTOR_PREFIX, hub_state_dict, save_longva

    save_longva(model, tokenizer, folder, weights=weights)
    if projector_file:
        projector = {k: v.detach().cpu().clone() for k, v in hub_state_dict(weights).items() if k.startswith(PROJECTOR_PREFIX)}
        torch.save(projector, folder / PROJECTOR_FILES[0])


# ---------------------------------------------------------------- training


def align(recipe: AlignRecipe, resume: str | Path | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Train per `recipe`; returns a summary dictionary (steps, samples, tokens, losses,
    skipped samples, truncation counts, the last checkpoint, and in a one-process run the
    trained `model` itself).

    `resume` (a checkpoint or run folder) continues a run; `overwrite` replaces the earlier run
    in train.output_dir; without either, a folder holding a run is refused. One process, or any
    number under torchrun / deepspeed (data parallel, ZeRO-sharded).
    """
    from longva_cli.train.multimodal_data import load_records

    check(recipe)
    require_extra("train", ("deepspeed",), "`longva align`")
    # Read and check every record before anything heavy loads: a bad file fails in a second.
    kind = "preference" if recipe.train.mode == "dpo" else "conversation"
    records, missing = load_records(recipe.data.path, kind, recipe.data.image_folder, recipe.data.video_folder)
    if not records:
        raise LongVAError(f"{recipe.data.path} has no usable samples ({len(missing)} skipped for missing media files).")
    loop.prepare_output(recipe.train.output_dir, resume, overwrite)
    with loop.processes() as state:
        return _train(recipe, resume, state, records, missing)


class AlignTask:
    """align's part of the loop: media samples in length-grouped batches, SFT or DPO losses,
    and the counts of samples, tokens, cut sequences and skipped samples."""

    name, unit = "align", "samples"

    def __init__(self, recipe: AlignRecipe, state: ParallelState, dataset, lengths: list[int], steps_per_epoch: int,
                 tokens_per_image: int, missing: list, reference=None, reference_logps=None) -> None:
        import torch

        self.recipe, self.state, self.dataset, self.lengths = recipe, state, dataset, lengths
        self.steps_per_epoch, self.tokens_per_image = steps_per_epoch, tokens_per_image
        self.reference, self.reference_logps = reference, reference_logps
        train = recipe.train
        self.per_step = train.micro_batch_size * train.grad_accum * state.world_size
        self.samples = self.tokens = self.truncated = self.tokens_cut = 0
        self.skipped = [{"id": s.id, "reason": s.reason} for s in missing]
        self.device = torch.device(state.device())
        self._reset_step()

    def _reset_step(self) -> None:
        import torch

        self.counts = torch.zeros(4, dtype=torch.float64, device=self.device)  # samples, tokens, truncated, tokens cut
        self.new_skips, self.stats = [], []

    def restore(self, client_state: dict[str, Any]) -> None:
        self.samples, self.tokens = int(client_state.get("samples", 0)), int(client_state.get("tokens", 0))
        self.skipped = client_state.get("skipped", self.skipped)
        self.truncated, self.tokens_cut = int(client_state.get("truncated", 0)), int(client_state.get("tokens_cut", 0))

    def client_state(self) -> dict[str, Any]:
        return {"samples": self.samples, "tokens": self.tokens, "skipped": self.skipped,
                "truncated": self.truncated, "tokens_cut": self.tokens_cut}

    def micro_batches(self, step: int) -> Iterator[Any]:
        """This rank's micro batches from step `step` on, epoch after epoch (each epoch its own
        seeded grouping, so a resumed run finds its place)."""
        import torch

        from longva_cli.train.multimodal_data import length_grouped_batches

        train, data, world, rank = self.recipe.train, self.recipe.data, self.state.world_size, self.state.rank
        micro_per_epoch = self.steps_per_epoch * train.grad_accum
        micro = step * train.grad_accum
        while True:
            epoch, offset = divmod(micro, micro_per_epoch)
            batches = length_grouped_batches(self.lengths, train.micro_batch_size, world, train.seed, epoch, data.group_by_length)
            plan = [batches[(k * world + rank) % len(batches)] for k in range(offset, micro_per_epoch)]
            loader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=plan, num_workers=data.num_workers,
                collate_fn=_Collate(data.max_length, self.tokens_per_image),
            )
            yield from loader
            micro = (epoch + 1) * micro_per_epoch

    def loss(self, engine, batch):
        import torch

        from longva_cli.train.dpo import dpo_loss

        if self.recipe.train.mode == "dpo" and batch.ids:
            policy = engine(batch).view(-1, 2)  # [pairs, (chosen, rejected)]
            ref = _reference(self.reference, self.reference_logps, batch, self.device).view(-1, 2)
            loss, stat = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], self.recipe.dpo.beta)
            self.stats.append(stat)
        elif self.recipe.train.mode == "dpo":  # every pair was skipped: a zero loss keeps the ranks in step
            loss = engine(batch).sum() * 0
        else:
            loss = engine(batch)
        self.counts += torch.tensor([len(batch.ids), batch.tokens, batch.truncated, batch.tokens_cut],
                                    dtype=torch.float64, device=self.device)
        self.new_skips += [{"id": s.id, "reason": s.reason} for s in batch.skipped]
        return loss

    def end_step(self, elapsed: float) -> dict[str, Any]:
        import torch.distributed as dist

        from longva_cli.console import stderr

        counts, new_skips = self.counts, self.new_skips
        if self.state.world_size > 1:
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
            gathered = [None] * self.state.world_size
            dist.all_gather_object(gathered, new_skips)
            new_skips = [s for rank_skips in gathered for s in rank_skips]
        known = {item["id"] for item in self.skipped}
        for item in new_skips:
            if item["id"] in known:  # the same sample fails again in a later epoch
                continue
            known.add(item["id"])
            self.skipped.append(item)
            if self.state.is_main:
                stderr.print(f"[yellow]skipped sample {item['id']}: {item['reason']}[/yellow]")
        samples, tokens, truncated, tokens_cut = (int(c) for c in counts.tolist())
        self.samples += samples
        self.tokens += tokens
        self.truncated += truncated
        self.tokens_cut += tokens_cut
        record = {
            "samples": self.samples,
            "tokens": self.tokens,
            "samples_per_s": round(samples / elapsed, 2),
            "tokens_per_s": round(tokens / elapsed, 1),
            "skipped": len(self.skipped),
        }
        for key in ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy"):
            values = [s[key] for s in self.stats if key in s]
            if values:
                record[key] = round(sum(values) / len(values), 6)
        self._reset_step()
        return record

    def finish(self, summary: dict[str, Any]) -> None:
        import json
        from collections import Counter

        from longva_cli.console import stderr

        summary.update(samples=self.samples, skipped=self.skipped, truncated=self.truncated, tokens_cut=self.tokens_cut)
        if not self.state.is_main:
            return
        output_dir, skipped = self.recipe.train.output_dir, self.skipped
        if skipped:
            with (output_dir / "skipped.jsonl").open("w") as f:
                f.writelines(json.dumps(item) + "\n" for item in skipped)
        if self.truncated:
            stderr.print(f"{self.truncated} sequences were longer than data.max_length={self.recipe.data.max_length}: "
                         f"{self.tokens_cut:,} tokens were cut from their ends.")
        if skipped:
            kinds = Counter("missing media" if s["reason"].startswith("missing") else
                            "past max_length" if "max_length" in s["reason"] else "undecodable media" for s in skipped)
            stderr.print(
                f"[yellow]Skipped {len(skipped)} samples ({', '.join(f'{n} {k}' for k, n in kinds.items())}): "
                f"{', '.join(s['id'] for s in skipped[:10])}{' …' if len(skipped) > 10 else ''}; "
                f"all listed in {output_dir / 'skipped.jsonl'}[/yellow]"
            )


def _train(recipe: AlignRecipe, resume, state: ParallelState, records, missing) -> dict[str, Any]:
    import torch

    from longva_cli.console import stderr
    from longva_cli.engine.loader import resolve_attention
    from longva_cli.recipes import to_dict
    from longva_cli.train import checkpoint
    from longva_cli.train import deepspeed_setup
    from longva_cli.train.multimodal_data import AlignDataset, AlignModule, steps_per_epoch

    train, opt, data, par = recipe.train, recipe.optimizer, recipe.data, recipe.parallel
    device = torch.device(state.device())
    precision = resolve_precision(train.precision, device.type == "cuda")
    dtype = torch_dtype(precision)
    parts = tunable_parts(recipe)
    ds_config = deepspeed_setup.deepspeed_config(train, par, opt, state.world_size, precision)
    attention = resolve_attention(recipe.model.attn_implementation, device)
    model, tokenizer, processing = build_model(recipe, dtype, attention)
    model.to(device)
    reference = None
    if train.mode == "dpo" and recipe.dpo.reference == "model":
        import copy

        frozen = copy.deepcopy(model).eval().requires_grad_(False)
        reference = AlignModule(frozen, "dpo", train.loss_chunk, visual_in_graph=False)
    lrs = {
        "mm_language_model": opt.lr,
        "mm_vision_tower": opt.mm_vision_tower_lr or opt.lr,
        "mm_mlp_adapter": opt.mm_projector_lr or opt.lr,
    }
    groups = set_trainable(model, parts, lrs)
    if train.gradient_checkpointing:
        from longva_cli.model.compat import enable_activation_checkpointing

        # non-reentrant checkpointing works with ZeRO-3 hooks and with inputs that need no grad
        enable_activation_checkpointing(model.language_model, use_reentrant=False)
        if "mm_vision_tower" in parts:
            enable_activation_checkpointing(model.vision_tower, use_reentrant=False)

    dataset = AlignDataset(
        records, tokenizer, mode=train.mode, template=data.template, system=data.system, processing=processing,
        pinpoints=model.mm.image_grid_pinpoints, frames=data.frames, tokens_per_image=model.tokens_per_image,
    )
    lengths = [dataset.estimated_length(i) for i in range(len(dataset))]
    per_epoch = steps_per_epoch(-(-len(dataset) // train.micro_batch_size), state.world_size, train.grad_accum)
    total_steps = train.max_steps or per_epoch * train.epochs

    visual_in_graph = bool({"mm_vision_tower", "mm_mlp_adapter"} & set(parts))
    module = AlignModule(model, train.mode, train.loss_chunk, visual_in_graph=visual_in_graph)
    engine, scheduler = deepspeed_setup.initialize(
        module,
        lr=opt.lr,
        betas=tuple(opt.betas),
        weight_decay=opt.weight_decay,
        eps=opt.eps,
        schedule=opt.schedule,
        warmup_steps=warmup_steps(opt.warmup_ratio, total_steps),
        max_steps=total_steps,
        ds_config=ds_config,
        param_groups=groups,
    )
    engine.train()
    reference_logps = None
    if train.mode == "dpo" and recipe.dpo.reference == "precomputed":
        reference_logps = _precompute_reference(
            engine, dataset, data, model.tokens_per_image, train.output_dir, state, resumed=resume is not None
        )
    projector_only = parts == ["mm_mlp_adapter"]

    def save_model(folder: Path, weights) -> None:
        write_longva_folder(folder, weights, model, tokenizer, projector_file=projector_only)

    task = AlignTask(recipe, state, dataset, lengths, per_epoch, model.tokens_per_image, missing,
                     reference=reference, reference_logps=reference_logps)
    if state.is_main:
        source = recipe.model.name_or_path or f"{recipe.model.language_model} + {recipe.model.vision_tower}"
        stderr.print(
            f"align ({train.mode}, {data.template}): {source}; training {', '.join(parts)}; {len(records)} samples"
            f"{f' ({len(missing)} skipped: missing media)' if missing else ''}; {total_steps} steps of "
            f"{train.micro_batch_size} x {train.grad_accum} accum x {state.world_size} processes; ZeRO-{par.zero_stage}, {precision}"
        )
        for item in task.skipped[:5]:
            stderr.print(f"[yellow]skipping sample {item['id']}: {item['reason']}[/yellow]")
        if len(task.skipped) > 5:
            stderr.print(f"[yellow]… and {len(task.skipped) - 5} more (listed in {train.output_dir / 'skipped.jsonl'} at the end)[/yellow]")
    summary = loop.run(
        task, engine, scheduler, state, train=train, total_steps=total_steps, peak_lr=opt.lr,
        logging=recipe.logging, recipe=to_dict(recipe), save_model=save_model,
        needed_bytes=checkpoint.estimate_bytes(model), resume=resume,
    )
    summary["model"] = model if state.world_size == 1 else None
    return summary


class _Collate:
    """Picklable collate function for DataLoader workers."""

    def __init__(self, max_length: int, tokens_per_image: int) -> None:
        self.max_length, self.tokens_per_image = max_length, tokens_per_image

    def __call__(self, items):
        from longva_cli.train.multimodal_data import collate

        return collate(items, self.max_length, self.tokens_per_image)


def _reference(reference, reference_logps, batch, device):
    """The reference log-probs of a batch's sequences: from the frozen copy or the precomputed table."""
    import torch

    if reference_logps is not None:
        return torch.tensor([v for sample_id in batch.ids for v in reference_logps[sample_id]], device=device)
    with torch.no_grad():
        return reference(batch)


def _precompute_reference(engine, dataset, data, tokens_per_image, output_dir: Path, state, resumed: bool) -> dict[str, list[float]]:
    """Log-probs of every pair under the starting model, before any update (cached in output_dir).

    Every rank computes every pair in the same order, so ZeRO-3's collective forwards stay in step.
    """
    import json

    import torch

    from longva_cli.train.multimodal_data import collate

    cache = Path(output_dir) / "reference_logps.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    if resumed:
        raise LongVAError(
            f"{cache} is missing, and after resuming the model is no longer the reference; restore the file or use dpo.reference=model."
        )
    table = {}
    engine.eval()
    with torch.no_grad():
        for index in range(len(dataset)):
            batch = collate([dataset[index]], data.max_length, tokens_per_image)
            logps = engine(batch)
            if batch.ids:
                table[batch.ids[0]] = logps.float().cpu().tolist()
    engine.train()
    if state.is_main:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(table))
    return table


# ---------------------------------------------------------------- CLI


def command(
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="Recipe YAML: a bundled name (align/tiny-cpu) or a path."),
    overrides: options.Overrides = None,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help=loop.OUTPUT_HELP),
    resume: Optional[Path] = typer.Option(None, "--resume", help=loop.RESUME_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help=loop.OVERWRITE_HELP),
    make_tiny_example: Optional[Path] = typer.Option(
        None, "--make-tiny-example", help="Write a tiny model, images, videos and data files to this folder (for align/tiny-cpu), then exit."
    ),
) -> None:
    """Vision-text alignment: projector pretraining, full fine-tuning, or DPO, from a recipe.

    Trailing key=value arguments override recipe settings (dotted keys, YAML values).
    Multi-GPU / multi-node: launch the same command under torchrun or deepspeed. Prints the
    last checkpoint's folder on stdout; progress and the summary go to stderr.

    examples:
      longva align --make-tiny-example runs/align-tiny-example
      longva align --recipe align/tiny-cpu
      longva align --recipe align/stage1-projector data.image_folder=/data/blip558k/images
      torchrun --nproc-per-node 8 -m longva_cli align --recipe align/stage2-full
      longva align --recipe align/dpo dpo.beta=0.2 train.max_steps=100
      longva align --recipe align/stage2-full --resume runs/align-stage2
    """
    if make_tiny_example is not None:
        from longva_cli.console import stderr
        from longva_cli.train.tiny_example import write_tiny_example

        folder = write_tiny_example(make_tiny_example)
        where = "" if folder == Path("runs/align-tiny-example").resolve() else (
            f" model.name_or_path={folder / 'model'} data.path={folder / 'conversations.json'} "
            f"data.image_folder={folder / 'images'} data.video_folder={folder / 'videos'}"
        )
        stderr.print(f"Wrote a tiny LongVA and alignment data to {folder}; now run `longva align --recipe align/tiny-cpu{where}`.")
        return
    if recipe is None:
        raise LongVAError("give --recipe (e.g. align/tiny-cpu) or --make-tiny-example DIR.")
    loop.run_recipe_command(align, AlignRecipe, recipe, overrides or [], output, resume, overwrite)
