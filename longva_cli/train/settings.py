"""The recipe sections `extend-text` and `align` share, spelled once, and their value checks.

Each command's recipe holds these sections with its own defaults (`field(default_factory=...)`,
which `longva_cli.recipes.build` starts from), and adds only the keys that are its own: the
part learning rates of `align`, sequence parallelism of `extend-text`, and so on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, Optional

from longva_cli.checks import check_number
from longva_cli.defaults import LOSS_CHUNK
from longva_cli.errors import LongVAError


@dataclass
class OptimizerSettings:
    lr: float = 1e-5  # peak learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0  # AdamW's, on weight matrices (not on biases and norms)
    eps: float = 1e-8
    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_ratio: float = 0.0  # fraction of the run's optimizer steps with a linear warm-up
    grad_clip: Optional[float] = 1.0  # largest gradient norm; null: no clipping

    # old spellings: a recipe that uses one is told what replaced it
    RENAMED: ClassVar[dict[str, str]] = {
        "warmup_steps": "optimizer.warmup_steps is now optimizer.warmup_ratio, a fraction of the run's steps "
        "(e.g. 30 warm-up steps of 1000 are warmup_ratio: 0.03; 0 stays 0)",
    }


@dataclass
class TrainSettings:
    max_steps: Optional[int] = None  # optimizer steps (align: null runs train.epochs)
    micro_batch_size: int = 1  # sequences (align: samples, DPO pairs) per data-parallel rank per micro step
    grad_accum: int = 1
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPUs, fp32 on CPU
    gradient_checkpointing: bool = True
    seed: int = 42
    save_every: int = 1000  # optimizer steps between checkpoints (the last step is always saved)
    output_dir: Path = Path("runs/train")  # --output overrides it
    loss_chunk: int = LOSS_CHUNK  # tokens per cross-entropy chunk (bounds the logits in memory)


@dataclass
class ParallelSettings:
    zero_stage: Literal[0, 1, 2, 3] = 3
    offload_params: bool = False  # ZeRO-3 parameters in CPU memory
    offload_optimizer: bool = False  # optimizer state in CPU memory (DeepSpeed's CPU Adam)


@dataclass
class LoggingSettings:
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "longva"


def check_optimizer(opt: OptimizerSettings) -> None:
    """Impossible optimizer values, named before DeepSpeed starts."""
    check_number("recipe key optimizer.lr", opt.lr, above=0)
    if len(opt.betas) != 2:
        raise LongVAError(f"recipe key optimizer.betas must be two numbers like [0.9, 0.999], got {opt.betas}.")
    for i, beta in enumerate(opt.betas):
        check_number(f"recipe key optimizer.betas[{i}]", beta, at_least=0, below=1)
    check_number("recipe key optimizer.weight_decay", opt.weight_decay, at_least=0)
    check_number("recipe key optimizer.eps", opt.eps, above=0)
    check_number("recipe key optimizer.warmup_ratio", opt.warmup_ratio, at_least=0, below=1)
    check_number("recipe key optimizer.grad_clip", opt.grad_clip, above=0, nullable=True)


def check_train(train: TrainSettings) -> None:
    """Counts that must be at least one, and a seed torch and numpy both take."""
    check_number("recipe key train.max_steps", train.max_steps, integer=True, at_least=1, nullable=True)
    for key in ("micro_batch_size", "grad_accum", "save_every", "loss_chunk"):
        check_number(f"recipe key train.{key}", getattr(train, key), integer=True, at_least=1)
    check_number("recipe key train.seed", train.seed, integer=True, at_least=0, at_most=2**63 - 1)


def check_parallel(par: ParallelSettings) -> None:
    if par.offload_params and par.zero_stage != 3:
        raise LongVAError("parallel.offload_params needs parallel.zero_stage=3.")


def resolve_precision(precision: str, cuda: bool) -> str:
    """`auto` -> bf16 on GPUs, fp32 on CPUs (CPU bf16 matmuls are slow and lose precision)."""
    if precision != "auto":
        return precision
    return "bf16" if cuda else "fp32"


def torch_dtype(precision: str):
    """The torch dtype of a resolved precision."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def warmup_steps(ratio: float, total_steps: int) -> int:
    """Warm-up steps of a run of `total_steps` (rounded up, so any positive ratio warms up)."""
    return math.ceil(ratio * total_steps)
