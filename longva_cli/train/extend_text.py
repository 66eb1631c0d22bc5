"""`longva extend-text`: long-context continued pretraining of a Qwen2 text model.

LongVA's first stage: raise RoPE's base (rope_theta) and keep pretraining the language model
on long sequences, so it attends over 224K tokens before it ever sees a video. Settings come
from a YAML recipe (`recipes/extend-text/`), validated against `ExtendTextRecipe`; the work
is done by DeepSpeed ZeRO with sequence parallelism (`sequence_parallel`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import typer

from longva_cli.errors import LongVAError

# ---------------------------------------------------------------- recipe schema


@dataclass
class ModelSettings:
    name_or_path: str = "Qwen/Qwen2-7B-Instruct"  # hub name or local HF folder (init: pretrained)
    init: Literal["pretrained", "random"] = "pretrained"  # random: a fresh Qwen2 from `config`
    config: dict = field(default_factory=dict)  # Qwen2Config fields for init: random
    tokenizer: Optional[str] = None  # default: name_or_path; "tiny": the built-in test tokenizer
    rope_theta: Optional[float] = None  # the new RoPE base; null keeps the model's
    max_position_embeddings: Optional[int] = None  # written to config.json; null: data.seq_len


@dataclass
class DataSettings:
    source: str = "LongVa/slimpajama_Qwen2_tokenized_upsample_4096_chunk_256K"  # or a path, or synthetic
    seq_len: int = 224_000  # tokens per training sequence (each row gives seq_len + 1 tokens)
    split: str = "train"
    column: str = "input_ids"  # token column of pre-tokenized datasets
    text_field: str = "text"  # text field of .jsonl / .parquet files to tokenize
    cache_dir: Path = Path("runs/cache")  # packed-token caches of local text
    shuffle: bool = True  # a fresh permutation of rows per epoch, seeded by train.seed
    synthetic_rows: int = 64  # rows of the `synthetic` source


@dataclass
class OptimizerSettings:
    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.1
    eps: float = 1e-8
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    grad_clip: Optional[float] = 1.0


@dataclass
class TrainSettings:
    max_steps: int = 1000  # optimizer steps
    micro_batch_size: int = 1  # sequences per data-parallel group per micro step
    grad_accum: int = 4
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    gradient_checkpointing: bool = True
    seed: int = 2024
    save_every: int = 200  # steps between checkpoints (the last step is always saved)
    output_dir: Path = Path("runs/extend")
    loss_chunk: int = 4096  # tokens per cross-entropy chunk (bounds the logits in memory)


@dataclass
class ParallelSettings:
    sequence_parallel: int = 1  # ranks that share one sequence
    backend: Literal["ulysses", "ring"] = "ulysses"  # ring: zigzag ring-flash-attn, GPU only
    zero_stage: Literal[0, 1, 2, 3] = 3
    offload_params: bool = False  # ZeRO-3 parameters in CPU memory
    offload_optimizer: bool = False  # optimizer state in CPU memory (DeepSpeed's CPU Adam)


@dataclass
class LoggingSettings:
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "longva"


@dataclass
class ExtendTextRecipe:
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    parallel: ParallelSettings = field(default_factory=ParallelSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)


def check_recipe(recipe: ExtendTextRecipe) -> None:
    """Value checks the type-level validation cannot express."""
    positive = {
        "data.seq_len": recipe.data.seq_len,
        "train.max_steps": recipe.train.max_steps,
        "train.micro_batch_size": recipe.train.micro_batch_size,
        "train.grad_accum": recipe.train.grad_accum,
        "train.save_every": recipe.train.save_every,
        "train.loss_chunk": recipe.train.loss_chunk,
        "parallel.sequence_parallel": recipe.parallel.sequence_parallel,
    }
    for key, value in positive.items():
        if value < 1:
            raise LongVAError(f"recipe key {key} must be at least 1, got {value}.")
    if len(recipe.optimizer.betas) != 2:
        raise LongVAError(f"recipe key optimizer.betas must be two numbers like [0.9, 0.95], got {recipe.optimizer.betas}.")
    if recipe.model.init == "random" and recipe.model.tokenizer is None and recipe.data.source != "synthetic":
        raise LongVAError("model.init=random needs model.tokenizer (a tokenizer folder or `tiny`) to read text data.")
    if recipe.parallel.offload_params and recipe.parallel.zero_stage != 3:
        raise LongVAError("parallel.offload_params needs parallel.zero_stage=3.")
    from longva_cli.train.data import is_local

    source = recipe.data.source
    if source != "synthetic" and is_local(source) and not Path(source).expanduser().exists():
        raise LongVAError(
            f"data source {source} does not exist; point data.source at a .txt/.jsonl/.parquet file, a folder of "
            "them, a saved datasets folder, or a hub dataset name like org/name."
        )


# ---------------------------------------------------------------- model


def build_tokenizer(settings: ModelSettings, vocab_size: int | None):
    if settings.tokenizer == "tiny":
        from longva_cli.model.tiny import build_tiny_tokenizer

        return build_tiny_tokenizer(vocab_size or 512)
    name = settings.tokenizer or (settings.name_or_path if settings.init == "pretrained" else None)
    if name is None:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except OSError as err:
        raise LongVAError(f"could not load the tokenizer {name} ({err.__class__.__name__}); check model.tokenizer.") from None


def build_model(recipe: ExtendTextRecipe, ds_config: dict[str, Any]):
    """The Qwen2 model with the recipe's RoPE base and context length in its config.

    Pretrained weights load under ZeRO-3 already partitioned (via HfDeepSpeedConfig), so a 7B
    model never sits whole on one GPU. A random model is built identically on every rank from
    train.seed; DeepSpeed partitions it afterwards.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config

    settings = recipe.model
    if settings.init == "random":
        config = Qwen2Config(**settings.config)
    else:
        try:
            config = AutoConfig.from_pretrained(settings.name_or_path)
        except OSError as err:
            raise LongVAError(
                f"could not load the model {settings.name_or_path} ({err.__class__.__name__}); check model.name_or_path "
                "(a hub name or a local folder with config.json)."
            ) from None
    if settings.rope_theta is not None:
        config.rope_parameters = {**(config.rope_parameters or {}), "rope_type": "default", "rope_theta": settings.rope_theta}
    config.max_position_embeddings = settings.max_position_embeddings or recipe.data.seq_len
    config.use_cache = False
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[recipe.train.precision]
    torch.manual_seed(recipe.train.seed)
    if settings.init == "random":
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        keep_alive = None
        if ds_config["zero_optimization"]["stage"] == 3:
            from transformers.integrations import HfDeepSpeedConfig

            keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841  (its presence turns on zero.Init)
        model = AutoModelForCausalLM.from_pretrained(settings.name_or_path, config=config, dtype=dtype)
        del keep_alive
    if recipe.train.gradient_checkpointing:
        # non-reentrant checkpointing works with ZeRO-3 hooks and with inputs that need no grad
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


# ---------------------------------------------------------------- training


def extend_text(recipe: ExtendTextRecipe, resume: str | Path | None = None) -> dict[str, Any]:
    """Train per `recipe` (optionally resuming a checkpoint); returns a summary dictionary.

    Works the same as one process or under torchrun/deepspeed with any number of processes.
    """
    import sys

    check_recipe(recipe)
    par = recipe.parallel
    launched = "WORLD_SIZE" in os.environ or (
        "torch.distributed" in sys.modules and sys.modules["torch.distributed"].is_initialized()
    )
    if not launched and par.sequence_parallel > 1:  # checked before the slow imports
        raise LongVAError(
            f"parallel.sequence_parallel={par.sequence_parallel} needs that many processes; launch with "
            f"`torchrun --nproc-per-node {par.sequence_parallel} -m longva_cli extend-text ...` "
            "or set parallel.sequence_parallel=1."
        )
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from longva_cli.train import sequence_parallel as sp
    from longva_cli.train.engine import quiet_libraries

    quiet_libraries()
    state = sp.init_distributed(par.sequence_parallel, par.backend)
    try:
        return _train(recipe, resume, state)
    finally:
        sp.shutdown(state)  # without destroying the group, gloo runs sometimes abort at exit


def _train(recipe: ExtendTextRecipe, resume, state) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from longva_cli.console import progress, stderr
    from longva_cli.recipes import to_dict
    from longva_cli.train import checkpoint, data, engine as engines, sequence_parallel as sp
    from longva_cli.train.loss import CausalLMLoss
    from longva_cli.train.metrics import MetricsLog

    train, par, opt = recipe.train, recipe.parallel, recipe.optimizer
    L = recipe.data.seq_len
    ds_config = engines.deepspeed_config(
        micro_batch_size=train.micro_batch_size,
        grad_accum=train.grad_accum,
        world_size=state.world_size,
        zero_stage=par.zero_stage,
        precision=train.precision,
        grad_clip=opt.grad_clip,
        offload_params=par.offload_params,
        offload_optimizer=par.offload_optimizer,
    )
    model = build_model(recipe, ds_config)
    sp.check_layout(L, state.sp_degree, par.backend, model.config.num_key_value_heads)
    sp.enable(model, state)
    tokenizer = build_tokenizer(recipe.model, model.config.vocab_size)
    rows = data.open_rows(
        recipe.data.source,
        L + 1,
        tokenizer=tokenizer,
        column=recipe.data.column,
        text_field=recipe.data.text_field,
        split=recipe.data.split,
        cache_dir=recipe.data.cache_dir,
        synthetic_rows=recipe.data.synthetic_rows,
        vocab_size=model.config.vocab_size,
        seed=train.seed,
        is_main=state.local_rank == 0,  # one packer per node, so node-local cache folders work too
        barrier=dist.barrier,
    )
    engine, scheduler = engines.initialize(
        CausalLMLoss(model, train.loss_chunk),
        lr=opt.lr,
        betas=tuple(opt.betas),
        weight_decay=opt.weight_decay,
        eps=opt.eps,
        schedule=opt.schedule,
        warmup_steps=opt.warmup_steps,
        max_steps=train.max_steps,
        ds_config=ds_config,
    )
    step, tokens_seen = 0, 0
    if resume is not None:
        client = checkpoint.load(engine, checkpoint.resolve(resume))
        step, tokens_seen = int(client.get("step", 0)), int(client.get("tokens", 0))

    ranges = _ranges(L, state)
    tokens_per_step = L * train.micro_batch_size * train.grad_accum * state.dp_world_size
    needed = checkpoint.estimate_bytes(model)
    log = MetricsLog(
        train.output_dir,
        tensorboard=recipe.logging.tensorboard,
        wandb=recipe.logging.wandb,
        wandb_project=recipe.logging.wandb_project,
        config=to_dict(recipe),
        enabled=state.is_main,
    )

    def save_model(folder: Path, weights: dict[str, torch.Tensor]) -> None:
        from longva_cli.model.tiny import save_tiny_tokenizer

        weights = {k.removeprefix("model."): v for k, v in weights.items()}
        model.save_pretrained(folder, state_dict=weights)
        if tokenizer is not None:
            save_tiny_tokenizer(tokenizer, folder) if recipe.model.tokenizer == "tiny" else tokenizer.save_pretrained(folder)

    if state.is_main:
        stderr.print(
            f"extend-text: {recipe.model.name_or_path if recipe.model.init == 'pretrained' else 'random Qwen2'}, "
            f"rope_theta {model.config.rope_parameters.get('rope_theta')}, {L:,} tokens x {train.micro_batch_size} x "
            f"{train.grad_accum} accum x {state.dp_world_size} data-parallel, sequence parallel {state.sp_degree} "
            f"({par.backend}), ZeRO-{par.zero_stage}, {len(rows)} rows of {rows.description}"
        )
    losses: list[float] = []
    start_time, start_step, saved = time.perf_counter(), step, None
    bar = progress(unit="tok")
    if state.is_main:
        bar.start()
    task = bar.add_task("extend-text", total=train.max_steps * tokens_per_step, completed=step * tokens_per_step)
    try:
        while step < train.max_steps:
            t0 = time.perf_counter()
            micro_losses = []
            for micro in range(train.grad_accum):
                stream = (step * train.grad_accum + micro) * state.dp_world_size + state.dp_rank
                row_ids = [
                    data.row_order(len(rows), stream * train.micro_batch_size + b, train.seed, recipe.data.shuffle)
                    for b in range(train.micro_batch_size)
                ]
                inputs, labels, positions = (t.to(engine.device) for t in data.local_batch(rows, row_ids, ranges))
                loss = engine(inputs, labels, positions)
                engine.backward(loss)
                engine.step()  # DeepSpeed only updates at the accumulation boundary
                micro_losses.append(loss.detach().float())
            step += 1
            tokens_seen += tokens_per_step
            mean = torch.stack(micro_losses).mean()
            if state.world_size > 1:  # equal token counts per rank: the mean of means is the mean
                dist.all_reduce(mean, op=dist.ReduceOp.SUM)
                mean /= state.world_size
            elapsed = time.perf_counter() - t0
            losses.append(mean.item())
            grad_norm = engine.get_global_grad_norm()
            record = {
                "loss": round(losses[-1], 6),
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "tokens": tokens_seen,
                "tokens_per_s": round(tokens_per_step / elapsed, 1),
                "step_time_s": round(elapsed, 3),
            }
            if torch.cuda.is_available():
                record["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
            record["peak_host_mem_gb"] = _peak_host_memory_gb()
            log.log(step, **record)
            bar.update(task, advance=tokens_per_step, description=f"step {step}/{train.max_steps} loss {losses[-1]:.4f}")
            if step % train.save_every == 0 or step == train.max_steps:
                saved = checkpoint.save(
                    engine,
                    train.output_dir,
                    step,
                    client_state={"step": step, "tokens": tokens_seen},
                    save_model=save_model,
                    state_dict=lambda: engines.full_state_dict(engine),
                    trainer_state={"step": step, "tokens": tokens_seen, "loss": losses[-1], "recipe": to_dict(recipe)},
                    needed_bytes=needed,
                    is_main=state.is_main,
                )
    finally:
        if state.is_main:
            bar.stop()
        log.close()
    wall = time.perf_counter() - start_time
    summary = {
        "steps": step,
        "steps_this_run": step - start_step,
        "tokens": tokens_seen,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "losses": losses,
        "tokens_per_s": round((step - start_step) * tokens_per_step / wall, 1) if step > start_step else None,
        "wall_s": round(wall, 1),
        "checkpoint": str(saved) if saved else None,
        "output_dir": str(train.output_dir),
    }
    if state.is_main:
        if losses:
            stderr.print(
                f"[green]Done:[/green] {summary['steps_this_run']} steps ({step}/{train.max_steps}), "
                f"{summary['steps_this_run'] * tokens_per_step:,} tokens in {wall:.0f} s "
                f"({summary['tokens_per_s']:,} tok/s), loss {losses[0]:.4f} -> {losses[-1]:.4f}; "
                f"checkpoint {saved}, metrics {train.output_dir / 'metrics.jsonl'}"
            )
        else:
            stderr.print(f"Nothing to do: the checkpoint is already at step {step} of train.max_steps={train.max_steps}.")
    return summary


def _ranges(seq_len: int, state) -> list[tuple[int, int]]:
    """This rank's input positions as [start, stop) runs (one, or two for zigzag)."""
    from longva_cli.train.sequence_parallel import shard_indices

    index = shard_indices(seq_len, state.sp_degree, state.sp_rank, state.backend).tolist()
    runs, start = [], index[0]
    for prev, cur in zip(index, index[1:] + [None]):
        if cur != prev + 1:
            runs.append((start, prev + 1))
            start = cur
    return runs


def _peak_host_memory_gb() -> float | None:
    """This process's peak resident memory (Linux reports KiB, macOS bytes)."""
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(peak / (1e9 if sys.platform == "darwin" else 1e6), 3)
    except ImportError:  # Windows
        return None


# ---------------------------------------------------------------- CLI


def command(
    ctx: typer.Context,
    recipe: str = typer.Option(..., "--recipe", "-r", help="Recipe YAML: a path or a bundled name (extend-text/tiny-cpu)."),
    resume: Optional[str] = typer.Option(
        None, "--resume", help="Continue from a checkpoint folder (step_<N>) or a run folder (uses its `latest`)."
    ),
) -> None:
    """Long-context continued pretraining of a Qwen2 text model (LongVA's first stage).

    Trailing key=value arguments override recipe settings (dotted keys, YAML values).
    Multi-GPU / multi-node: launch the same command under torchrun or deepspeed.

    examples:
      longva extend-text --recipe recipes/extend-text/tiny-cpu.yaml
      longva extend-text --recipe recipes/extend-text/qwen2-7b-224k.yaml train.max_steps=10 model.rope_theta=5e8
      torchrun --nnodes 2 --nproc-per-node 8 -m longva_cli extend-text --recipe recipes/extend-text/qwen2-7b-224k.yaml
      longva extend-text --recipe recipes/extend-text/qwen2-7b-224k.yaml --resume runs/extend/step_600
    """
    from longva_cli.recipes import load_recipe

    # the `deepspeed` launcher appends --local_rank=N; the rank comes from the environment anyway
    overrides = [a for a in ctx.args if not a.startswith(("--local_rank", "--local-rank"))]
    settings = load_recipe(ExtendTextRecipe, recipe, overrides)
    extend_text(settings, resume=resume)
