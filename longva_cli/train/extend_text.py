"""`longva extend-text`: long-context continued pretraining of a Qwen2 text model.

LongVA's first stage: raise RoPE's base (rope_theta) and keep pretraining the language model
on long sequences, so it attends over 224K tokens before it ever sees a video. Settings come
from a YAML recipe (bundled: `extend-text/*`), validated against `ExtendTextRecipe`; the work is
done by DeepSpeed ZeRO with sequence parallelism (`longva_cli.parallel.sequence_attention`) in
the shared loop (`loop`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional

import typer

from longva_cli import options
from longva_cli.checks import check_number, require_extra
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
class ExtendParallelSettings(ParallelSettings):
    sequence_parallel: int = 1  # ranks that share one sequence
    backend: Literal["ulysses", "ring"] = "ulysses"  # ring: zigzag ring-flash-attn, GPU only


@dataclass
class ExtendTextRecipe:
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    optimizer: OptimizerSettings = field(
        default_factory=lambda: OptimizerSettings(betas=[0.9, 0.95], weight_decay=0.1, schedule="constant")
    )
    train: TrainSettings = field(
        default_factory=lambda: TrainSettings(
            max_steps=1000, grad_accum=4, precision="bf16", seed=2024, save_every=200, output_dir=Path("runs/extend")
        )
    )
    parallel: ExtendParallelSettings = field(default_factory=ExtendParallelSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)


def check(recipe: ExtendTextRecipe) -> None:
    """Every value check of extend-text's settings, before any work (`longva recipes validate`
    runs the same)."""
    check_optimizer(recipe.optimizer)
    check_train(recipe.train)
    check_parallel(recipe.parallel)
    if recipe.train.max_steps is None:
        raise LongVAError("recipe key train.max_steps must be a number of steps for extend-text, got null.")
    for key in ("seq_len", "synthetic_rows"):
        check_number(f"recipe key data.{key}", getattr(recipe.data, key), integer=True, at_least=1)
    check_number("recipe key parallel.sequence_parallel", recipe.parallel.sequence_parallel, integer=True, at_least=1)
    check_number("recipe key model.rope_theta", recipe.model.rope_theta, above=0, nullable=True)
    check_number("recipe key model.max_position_embeddings", recipe.model.max_position_embeddings, integer=True, at_least=1, nullable=True)
    if recipe.model.init == "random" and recipe.model.tokenizer is None and recipe.data.source != "synthetic":
        raise LongVAError("model.init=random needs model.tokenizer (a tokenizer folder or `tiny`) to read text data.")
    from longva_cli.text_sources import is_local

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


def build_model(recipe: ExtendTextRecipe, ds_config: dict[str, Any], dtype):
    """The Qwen2 model with the recipe's RoPE base and context length in its config.

    Pretrained weights load under ZeRO-3 already partitioned (via HfDeepSpeedConfig), so a 7B
    model never sits whole on one GPU. A random model is built identically on every rank from
    train.seed (on the rank's GPU where it will stay whole); DeepSpeed partitions it afterwards.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config

    from longva_cli.model.compat import enable_activation_checkpointing

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
    torch.manual_seed(recipe.train.seed)
    if settings.init == "random":
        # Initialising on the CPU took 27 s of a 52 s start for a Qwen2-0.5B shape on an H100 node
        # (benchmarks/RESULTS.md, GPU suite), so the model is drawn on this rank's GPU; ZeRO-3 and
        # parameter offload are for models that may not fit one GPU whole, so they keep the CPU.
        zero = ds_config["zero_optimization"]
        on_gpu = torch.cuda.is_available() and zero["stage"] != 3 and "offload_param" not in zero
        with torch.device("cuda" if on_gpu else "cpu"):
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
        enable_activation_checkpointing(model, use_reentrant=False)
    return model


# ---------------------------------------------------------------- training


def extend_text(recipe: ExtendTextRecipe, resume: str | Path | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Train per `recipe`; returns a summary dictionary.

    `resume` (a checkpoint or run folder) continues a run; `overwrite` replaces the earlier run
    in train.output_dir; without either, a folder holding a run is refused. Works the same as
    one process or under torchrun/deepspeed with any number of processes.
    """
    from longva_cli.parallel.ranks import launched

    check(recipe)
    require_extra("train", ("deepspeed",), "`longva extend-text`")
    par = recipe.parallel
    if not launched() and par.sequence_parallel > 1:  # checked before the slow imports
        raise LongVAError(
            f"parallel.sequence_parallel={par.sequence_parallel} needs that many processes; launch with "
            f"`torchrun --nproc-per-node {par.sequence_parallel} -m longva_cli extend-text ...` "
            "or set parallel.sequence_parallel=1."
        )
    loop.prepare_output(recipe.train.output_dir, resume, overwrite)
    with loop.processes(par.sequence_parallel, par.backend) as state:
        return _train(recipe, resume, state)


class TextTask:
    """extend-text's part of the loop: rows of tokens, sharded over the sequence-parallel group."""

    name, unit = "extend-text", "tok"

    def __init__(self, rows, ranges: list[tuple[int, int]], state: ParallelState, recipe: ExtendTextRecipe) -> None:
        train = recipe.train
        self.rows, self.ranges, self.state = rows, ranges, state
        self.micro_batch_size, self.grad_accum, self.seed = train.micro_batch_size, train.grad_accum, train.seed
        self.shuffle = recipe.data.shuffle
        self.per_step = recipe.data.seq_len * train.micro_batch_size * train.grad_accum * state.dp_world_size
        self.tokens = 0

    def restore(self, client_state: dict[str, Any]) -> None:
        self.tokens = int(client_state.get("tokens", 0))

    def client_state(self) -> dict[str, Any]:
        return {"tokens": self.tokens}

    def micro_batches(self, step: int) -> Iterator[tuple]:
        from longva_cli.train import data

        micro = step * self.grad_accum
        while True:
            # every data-parallel group reads its own rows, in one seeded order
            stream = micro * self.state.dp_world_size + self.state.dp_rank
            row_ids = [
                data.row_order(len(self.rows), stream * self.micro_batch_size + b, self.seed, self.shuffle)
                for b in range(self.micro_batch_size)
            ]
            yield data.local_batch(self.rows, row_ids, self.ranges)
            micro += 1

    def loss(self, engine, batch):
        inputs, labels, positions = (t.to(engine.device) for t in batch)
        return engine(inputs, labels, positions)

    def end_step(self, elapsed: float) -> dict[str, Any]:
        self.tokens += self.per_step
        return {"tokens": self.tokens, "tokens_per_s": round(self.per_step / elapsed, 1)}

    def finish(self, summary: dict[str, Any]) -> None:
        """Nothing of its own: the loop's summary says it all."""


def _train(recipe: ExtendTextRecipe, resume, state: ParallelState) -> dict[str, Any]:
    import torch

    from longva_cli.console import stderr
    from longva_cli.parallel import sequence_attention
    from longva_cli.recipes import to_dict
    from longva_cli.train import checkpoint, data
    from longva_cli.train import deepspeed_setup
    from longva_cli.train.loss import CausalLMLoss

    train, par, opt = recipe.train, recipe.parallel, recipe.optimizer
    L = recipe.data.seq_len
    precision = resolve_precision(train.precision, torch.cuda.is_available())
    ds_config = deepspeed_setup.deepspeed_config(train, par, opt, state.world_size, precision)
    model = build_model(recipe, ds_config, torch_dtype(precision))
    sequence_attention.check_layout(L, state.sp_degree, par.backend, model.config.num_key_value_heads)
    sequence_attention.enable(model, state)
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
        barrier=state.barrier,
    )
    engine, scheduler = deepspeed_setup.initialize(
        CausalLMLoss(model, train.loss_chunk),
        lr=opt.lr,
        betas=tuple(opt.betas),
        weight_decay=opt.weight_decay,
        eps=opt.eps,
        schedule=opt.schedule,
        warmup_steps=warmup_steps(opt.warmup_ratio, train.max_steps),
        max_steps=train.max_steps,
        ds_config=ds_config,
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
            f"({par.backend}), ZeRO-{par.zero_stage}, {precision}, {len(rows)} rows of {rows.description}"
        )
    task = TextTask(rows, _ranges(L, state), state, recipe)
    return loop.run(
        task, engine, scheduler, state, train=train, total_steps=train.max_steps, peak_lr=opt.lr,
        logging=recipe.logging, recipe=to_dict(recipe), save_model=save_model,
        needed_bytes=checkpoint.estimate_bytes(model), resume=resume,
    )


def _ranges(seq_len: int, state: ParallelState) -> list[tuple[int, int]]:
    """This rank's input positions as [start, stop) runs (one, or two for zigzag)."""
    from longva_cli.parallel.sequence_attention import shard_indices

    index = shard_indices(seq_len, state.sp_degree, state.sp_rank, state.backend).tolist()
    runs, start = [], index[0]
    for prev, cur in zip(index, index[1:] + [None]):
        if cur != prev + 1:
            runs.append((start, prev + 1))
            start = cur
    return runs


# ---------------------------------------------------------------- CLI

def command(
    recipe: str = typer.Option(..., "--recipe", "-r", help="Recipe YAML: a bundled name (extend-text/tiny-cpu) or a path."),
    overrides: options.Overrides = None,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help=loop.OUTPUT_HELP),
    resume: Optional[Path] = typer.Option(None, "--resume", help=loop.RESUME_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help=loop.OVERWRITE_HELP),
) -> None:
    """Long-context continued pretraining of a Qwen2 text model (LongVA's first stage).

    Trailing key=value arguments override recipe settings (dotted keys, YAML values).
    Multi-GPU / multi-node: launch the same command under torchrun or deepspeed. Prints the
    last checkpoint's folder on stdout; progress and the summary go to stderr.

    examples:
      longva extend-text --recipe extend-text/tiny-cpu
      longva extend-text --recipe extend-text/qwen2-7b-224k train.max_steps=10 model.rope_theta=5e8
      torchrun --nnodes 2 --nproc-per-node 8 -m longva_cli extend-text --recipe extend-text/qwen2-7b-224k
      longva extend-text --recipe extend-text/qwen2-7b-224k --resume runs/extend-qwen2-7b-224k/step_600
    """
    loop.run_recipe_command(extend_text, ExtendTextRecipe, recipe, overrides or [], output, resume, overwrite)
