"""`longva align`: vision-text alignment training from YAML recipes (`recipes/align/`).

The three trainings of LongVA after its text stage, one loop:

- stage 1 (`stage1-projector`): captions in the `plain` template, only the projector learns;
- stage 2 (`stage2-full`): LLaVA-NeXT conversations in `qwen_1_5`, tower + projector + LM,
  images as UniRes crops, videos as uniform frames;
- DPO (`dpo`): preference pairs, policy against a frozen reference.

Every sample goes through the inference encoder (`LongVAForCausalLM.encode_pixels`), so what
the model learns on is exactly what `longva ask` feeds it. DeepSpeed ZeRO, the learning-rate
schedule, checkpoints and metrics are the shared helpers of `longva_cli.train`; checkpoints
are LongVA hub folders that `longva ask` and the original code load.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Optional

import typer

from longva_cli.errors import LongVAError
from longva_cli.train.extend_text import LoggingSettings

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
    frames: int = 32  # uniform frames per video, 144 tokens each
    max_length: int = 32768  # tokens per sequence (visual included); longer ones are cut and counted
    group_by_length: bool = True  # batches of samples of similar length (less padding)
    num_workers: int = 4  # DataLoader processes decoding media


@dataclass
class OptimizerSettings:
    lr: float = 1e-5  # language model (and every part without its own rate)
    mm_vision_tower_lr: Optional[float] = None
    mm_projector_lr: Optional[float] = None
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.03
    grad_clip: Optional[float] = 1.0


@dataclass
class TrainSettings:
    mode: Literal["sft", "dpo"] = "sft"
    epochs: int = 1
    max_steps: Optional[int] = None  # stop after this many optimizer steps (null: all epochs)
    micro_batch_size: int = 4  # samples (DPO: pairs) per GPU per micro step
    grad_accum: int = 1
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    gradient_checkpointing: bool = True
    seed: int = 42
    save_every: int = 1000  # optimizer steps between checkpoints (the last step is always saved)
    output_dir: Path = Path("runs/align")
    loss_chunk: int = 4096  # tokens per cross-entropy chunk


@dataclass
class DPOSettings:
    beta: float = 0.1
    reference: Literal["model", "precomputed"] = "model"  # frozen copy, or log-probs computed before training


@dataclass
class ParallelSettings:
    zero_stage: Literal[0, 1, 2, 3] = 3
    offload_params: bool = False
    offload_optimizer: bool = False


@dataclass
class AlignRecipe:
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
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


def check_recipe(recipe: AlignRecipe) -> None:
    """Value checks the type-level validation cannot express."""
    tunable_parts(recipe)
    positive = {
        "train.epochs": recipe.train.epochs,
        "train.micro_batch_size": recipe.train.micro_batch_size,
        "train.grad_accum": recipe.train.grad_accum,
        "train.save_every": recipe.train.save_every,
        "train.loss_chunk": recipe.train.loss_chunk,
        "data.frames": recipe.data.frames,
        "data.max_length": recipe.data.max_length,
    }
    for key, value in positive.items():
        if value < 1:
            raise LongVAError(f"recipe key {key} must be at least 1, got {value}.")
    if recipe.train.max_steps is not None and recipe.train.max_steps < 1:
        raise LongVAError(f"recipe key train.max_steps must be at least 1 or null, got {recipe.train.max_steps}.")
    if not 0 <= recipe.optimizer.warmup_ratio < 1:
        raise LongVAError(f"recipe key optimizer.warmup_ratio must be in [0, 1), got {recipe.optimizer.warmup_ratio}.")
    if len(recipe.optimizer.betas) != 2:
        raise LongVAError(f"recipe key optimizer.betas must be two numbers like [0.9, 0.999], got {recipe.optimizer.betas}.")
    if (recipe.model.name_or_path is None) == (recipe.model.language_model is None):
        raise LongVAError("set exactly one of model.name_or_path (a LongVA checkpoint) and model.language_model (a text model + model.vision_tower).")
    if recipe.train.mode == "dpo" and recipe.data.template != "qwen_1_5":
        raise LongVAError("train.mode=dpo uses the qwen_1_5 template; set data.template=qwen_1_5.")
    if recipe.parallel.offload_params and recipe.parallel.zero_stage != 3:
        raise LongVAError("parallel.offload_params needs parallel.zero_stage=3.")


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
        from longva_cli.model.longva import load_tokenizer

        folder = locate_model(settings.name_or_path)
        model = load_longva(folder, dtype=dtype, attn_implementation=attn_implementation)
        tokenizer = load_tokenizer(folder)
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
        mm = MultimodalConfig(vision_tower=settings.vision_tower, mm_hidden_size=tower.config.hidden_size,
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


def align(recipe: AlignRecipe, resume: str | Path | None = None) -> dict[str, Any]:
    """Train per `recipe` (optionally resuming a checkpoint); returns a summary dictionary
    (steps, samples, tokens, losses, skipped samples, truncation counts, the last checkpoint,
    and in a one-process run the trained `model` itself).

    One process, or any number under torchrun / deepspeed (data parallel, ZeRO-sharded).
    """
    check_recipe(recipe)
    from longva_cli.train.multimodal_data import load_records

    # Read and check every record before anything heavy loads: a bad file fails in a second.
    kind = "preference" if recipe.train.mode == "dpo" else "conversation"
    records, missing = load_records(recipe.data.path, kind, recipe.data.image_folder, recipe.data.video_folder)
    if not records:
        raise LongVAError(f"{recipe.data.path} has no usable samples ({len(missing)} skipped for missing media files).")
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from longva_cli.train import sequence_parallel as sp
    from longva_cli.train.engine import quiet_libraries

    quiet_libraries()
    state = sp.init_distributed(1)
    try:
        return _train(recipe, resume, state, records, missing)
    finally:
        sp.shutdown(state)  # without destroying the group, gloo runs sometimes abort at exit


def _train(recipe: AlignRecipe, resume, state, records, missing) -> dict[str, Any]:
    import json

    import torch
    import torch.distributed as dist

    from longva_cli.console import progress, stderr
    from longva_cli.model.longva import resolve_attention
    from longva_cli.recipes import to_dict
    from longva_cli.train import checkpoint
    from longva_cli.train import engine as engines
    from longva_cli.train.dpo import dpo_loss
    from longva_cli.train.metrics import MetricsLog
    from longva_cli.train.multimodal_data import (
        AlignDataset,
        AlignModule,
        length_grouped_batches,
        steps_per_epoch,
        warmup_steps,
    )

    train, opt, data, par = recipe.train, recipe.optimizer, recipe.data, recipe.parallel
    device = torch.device("cuda", state.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    precision = train.precision if train.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    parts = tunable_parts(recipe)
    ds_config = engines.deepspeed_config(
        micro_batch_size=train.micro_batch_size,
        grad_accum=train.grad_accum,
        world_size=state.world_size,
        zero_stage=par.zero_stage,
        precision=precision,
        grad_clip=opt.grad_clip,
        offload_params=par.offload_params,
        offload_optimizer=par.offload_optimizer,
    )
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
        # non-reentrant checkpointing works with ZeRO-3 hooks and with inputs that need no grad
        kwargs = {"activation_checkpointing_kwargs": {"use_reentrant": False}}
        model.language_model.activation_checkpointing_enable(**kwargs)
        if "mm_vision_tower" in parts:
            model.vision_tower.activation_checkpointing_enable(**kwargs)

    dataset = AlignDataset(
        records, tokenizer, mode=train.mode, template=data.template, system=data.system, processing=processing,
        pinpoints=model.mm.image_grid_pinpoints, frames=data.frames, tokens_per_image=model.tokens_per_image,
    )
    lengths = [dataset.estimated_length(i) for i in range(len(dataset))]
    n_batches = -(-len(dataset) // train.micro_batch_size)
    per_epoch = steps_per_epoch(n_batches, state.world_size, train.grad_accum)
    total_steps = train.max_steps or per_epoch * train.epochs
    warmup = warmup_steps(opt.warmup_ratio, total_steps)

    visual_in_graph = bool({"mm_vision_tower", "mm_mlp_adapter"} & set(parts))
    module = AlignModule(model, train.mode, train.loss_chunk, visual_in_graph=visual_in_graph)
    engine, scheduler = engines.initialize(
        module,
        lr=opt.lr,
        betas=tuple(opt.betas),
        weight_decay=opt.weight_decay,
        eps=opt.eps,
        schedule=opt.schedule,
        warmup_steps=warmup,
        max_steps=total_steps,
        ds_config=ds_config,
        param_groups=groups,
    )
    engine.train()
    step, samples_seen, tokens_seen = 0, 0, 0
    skipped = [{"id": s.id, "reason": s.reason} for s in missing]
    truncated = tokens_cut = 0
    if resume is not None:
        client = checkpoint.load(engine, checkpoint.resolve(resume))
        step, samples_seen, tokens_seen = (int(client.get(k, 0)) for k in ("step", "samples", "tokens"))
        skipped = client.get("skipped", skipped)
        truncated, tokens_cut = int(client.get("truncated", 0)), int(client.get("tokens_cut", 0))

    reference_logps = None
    if train.mode == "dpo" and recipe.dpo.reference == "precomputed":
        reference_logps = _precompute_reference(
            engine, dataset, data, model.tokens_per_image, train.output_dir, state, resumed=resume is not None
        )

    log = MetricsLog(train.output_dir, tensorboard=recipe.logging.tensorboard, wandb=recipe.logging.wandb,
                     wandb_project=recipe.logging.wandb_project, config=to_dict(recipe), enabled=state.is_main)
    projector_only = parts == ["mm_mlp_adapter"]

    def save_model(folder: Path, weights) -> None:
        write_longva_folder(folder, weights, model, tokenizer, projector_file=projector_only)

    def micro_batches(start_micro: int):
        """This rank's micro batches from global micro step `start_micro` on, epoch after epoch."""
        micro_per_epoch = per_epoch * train.grad_accum
        micro = start_micro
        while True:
            epoch, offset = divmod(micro, micro_per_epoch)
            batches = length_grouped_batches(lengths, train.micro_batch_size, state.world_size, train.seed, epoch, data.group_by_length)
            plan = [batches[(k * state.world_size + state.rank) % len(batches)] for k in range(offset, micro_per_epoch)]
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=plan, num_workers=data.num_workers,
                collate_fn=_Collate(data.max_length, model.tokens_per_image),
            )
            for batch in loader:
                yield batch
            micro = (epoch + 1) * micro_per_epoch

    if state.is_main:
        source = recipe.model.name_or_path or f"{recipe.model.language_model} + {recipe.model.vision_tower}"
        stderr.print(
            f"align ({train.mode}, {data.template}): {source}; training {', '.join(parts)}; {len(records)} samples"
            f"{f' ({len(missing)} skipped: missing media)' if missing else ''}; {total_steps} steps of "
            f"{train.micro_batch_size} x {train.grad_accum} accum x {state.world_size} processes; ZeRO-{par.zero_stage}, {precision}"
        )
        for item in skipped[:5]:
            stderr.print(f"[yellow]skipping sample {item['id']}: {item['reason']}[/yellow]")
        if len(skipped) > 5:
            stderr.print(f"[yellow]… and {len(skipped) - 5} more (listed in {train.output_dir / 'skipped.jsonl'} at the end)[/yellow]")
    losses: list[float] = []
    start_time, start_step, saved = time.perf_counter(), step, None
    samples_per_step = train.micro_batch_size * train.grad_accum * state.world_size
    bar = progress(unit="samples")
    if state.is_main:
        bar.start()
    task = bar.add_task("align", total=total_steps * samples_per_step, completed=step * samples_per_step)
    stream = micro_batches(step * train.grad_accum)
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            micro_losses, stats = [], []
            counts = torch.zeros(4, dtype=torch.float64)  # samples, tokens, truncated, tokens cut
            new_skips = []
            for _ in range(train.grad_accum):
                batch = next(stream)
                if train.mode == "dpo" and batch.ids:
                    policy = engine(batch).view(-1, 2)  # [pairs, (chosen, rejected)]
                    ref = _reference(reference, reference_logps, batch, device).view(-1, 2)
                    loss, stat = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], recipe.dpo.beta)
                    stats.append(stat)
                elif train.mode == "dpo":  # every pair was skipped: a zero loss keeps the ranks in step
                    loss = engine(batch).sum() * 0
                else:
                    loss = engine(batch)
                engine.backward(loss)
                engine.step()  # DeepSpeed only updates at the accumulation boundary
                micro_losses.append(loss.detach().float().cpu())
                counts += torch.tensor([len(batch.ids), batch.tokens, batch.truncated, batch.tokens_cut], dtype=torch.float64)
                new_skips += [{"id": s.id, "reason": s.reason} for s in batch.skipped]
            step += 1
            mean = torch.stack(micro_losses).mean()
            if state.world_size > 1:
                dist.all_reduce(mean, op=dist.ReduceOp.SUM)
                mean /= state.world_size
                dist.all_reduce(counts, op=dist.ReduceOp.SUM)
                gathered = [None] * state.world_size
                dist.all_gather_object(gathered, new_skips)
                new_skips = [s for rank_skips in gathered for s in rank_skips]
            known = {item["id"] for item in skipped}
            for item in new_skips:
                if item["id"] in known:  # the same sample fails again in a later epoch
                    continue
                known.add(item["id"])
                skipped.append(item)
                if state.is_main:
                    bar.console.print(f"[yellow]skipped sample {item['id']}: {item['reason']}[/yellow]")
            samples_seen += int(counts[0])
            tokens_seen += int(counts[1])
            truncated += int(counts[2])
            tokens_cut += int(counts[3])
            elapsed = time.perf_counter() - t0
            losses.append(mean.item())
            grad_norm = engine.get_global_grad_norm()
            record = {
                "loss": round(losses[-1], 6),
                "lr": opt.lr * scheduler.get_last_lr()[0] / scheduler.base_lrs[0],  # the schedule at optimizer.lr
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "samples": samples_seen,
                "tokens": tokens_seen,
                "samples_per_s": round(float(counts[0]) / elapsed, 2),
                "tokens_per_s": round(float(counts[1]) / elapsed, 1),
                "step_time_s": round(elapsed, 3),
                "skipped": len(skipped),
            }
            for key in ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy"):
                values = [s[key] for s in stats if key in s]
                if values:
                    record[key] = round(sum(values) / len(values), 6)
            if torch.cuda.is_available():
                record["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
            log.log(step, **record)
            bar.update(task, advance=samples_per_step,
                       description=f"step {step}/{total_steps} loss {losses[-1]:.4f} {record['tokens_per_s']:,.0f} tok/s")
            if step % train.save_every == 0 or step == total_steps:
                client = {"step": step, "samples": samples_seen, "tokens": tokens_seen, "skipped": skipped,
                          "truncated": truncated, "tokens_cut": tokens_cut}
                saved = checkpoint.save(
                    engine, train.output_dir, step, client_state=client, save_model=save_model,
                    state_dict=lambda: engines.full_state_dict(engine),
                    trainer_state={**client, "loss": losses[-1], "recipe": to_dict(recipe)},
                    needed_bytes=checkpoint.estimate_bytes(model), is_main=state.is_main,
                )
    finally:
        if state.is_main:
            bar.stop()
        log.close()
    wall = time.perf_counter() - start_time
    if state.is_main and skipped:
        with (train.output_dir / "skipped.jsonl").open("w") as f:
            f.writelines(json.dumps(item) + "\n" for item in skipped)
    summary = {
        "steps": step,
        "steps_this_run": step - start_step,
        "samples": samples_seen,
        "tokens": tokens_seen,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "losses": losses,
        "skipped": skipped,
        "truncated": truncated,
        "tokens_cut": tokens_cut,
        "wall_s": round(wall, 1),
        "checkpoint": str(saved) if saved else None,
        "output_dir": str(train.output_dir),
        "model": model if state.world_size == 1 else None,
    }
    if state.is_main:
        _print_summary(summary, total_steps, train.output_dir, data.max_length)
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


def _print_summary(summary: dict, total_steps: int, output_dir: Path, max_length: int) -> None:
    from collections import Counter

    from longva_cli.console import stderr

    losses = summary["losses"]
    if not losses:
        stderr.print(f"Nothing to do: the checkpoint is already at step {summary['steps']} of {total_steps}.")
        return
    stderr.print(
        f"[green]Done:[/green] {summary['steps_this_run']} steps ({summary['steps']}/{total_steps}), "
        f"{summary['samples']:,} samples, {summary['tokens']:,} tokens in {summary['wall_s']:.0f} s; "
        f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; checkpoint {summary['checkpoint']}, metrics {output_dir / 'metrics.jsonl'}"
    )
    if summary["truncated"]:
        stderr.print(f"{summary['truncated']} sequences were longer than data.max_length={max_length}: "
                     f"{summary['tokens_cut']:,} tokens were cut from their ends.")
    if summary["skipped"]:
        kinds = Counter("missing media" if s["reason"].startswith("missing") else
                        "past max_length" if "max_length" in s["reason"] else "undecodable media" for s in summary["skipped"])
        stderr.print(
            f"[yellow]Skipped {len(summary['skipped'])} samples ({', '.join(f'{n} {k}' for k, n in kinds.items())}): "
            f"{', '.join(s['id'] for s in summary['skipped'][:10])}{' …' if len(summary['skipped']) > 10 else ''}; "
            f"all listed in {output_dir / 'skipped.jsonl'}[/yellow]"
        )


# ---------------------------------------------------------------- CLI


def command(
    ctx: typer.Context,
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="Recipe YAML: a path or a bundled name (align/tiny-cpu)."),
    resume: Optional[str] = typer.Option(
        None, "--resume", help="Continue from a checkpoint folder (step_<N>) or a run folder (uses its `latest`)."
    ),
    make_tiny_example: Optional[Path] = typer.Option(
        None, "--make-tiny-example", help="Write a tiny model, images, videos and data files to this folder (for align/tiny-cpu), then exit."
    ),
) -> None:
    """Vision-text alignment: projector pretraining, full fine-tuning, or DPO, from a recipe.

    Trailing key=value arguments override recipe settings (dotted keys, YAML values).
    Multi-GPU / multi-node: launch the same command under torchrun or deepspeed.

    examples:
      longva align --make-tiny-example runs/align-tiny-example
      longva align --recipe recipes/align/tiny-cpu.yaml
      longva align --recipe recipes/align/stage1-projector.yaml data.image_folder=/data/blip558k/images
      torchrun --nproc-per-node 8 -m longva_cli align --recipe recipes/align/stage2-full.yaml
      longva align --recipe recipes/align/dpo.yaml dpo.beta=0.2 train.max_steps=100
      longva align --recipe recipes/align/stage2-full.yaml --resume runs/align-stage2
    """
    if make_tiny_example is not None:
        from longva_cli.console import stderr
        from longva_cli.train.tiny_example import write_tiny_example

        folder = write_tiny_example(make_tiny_example)
        stderr.print(f"Wrote a tiny LongVA and alignment data to {folder}; now run `longva align --recipe recipes/align/tiny-cpu.yaml`.")
        return
    if recipe is None:
        raise LongVAError("give --recipe (e.g. recipes/align/tiny-cpu.yaml) or --make-tiny-example DIR.")
    from longva_cli.recipes import load_recipe

    settings = load_recipe(AlignRecipe, recipe, list(ctx.args))
    align(settings, resume=resume)
