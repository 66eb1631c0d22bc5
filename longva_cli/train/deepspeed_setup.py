"""DeepSpeed ZeRO setup shared by the training commands.

DeepSpeed sees every rank as data parallel (we pass no `mpu`): ZeRO shards parameters and
optimizer state over all GPUs, and its gradient average over all ranks is exactly right for
sequence parallelism too, because every rank's loss is the mean over the same number of
tokens (see `loss.CausalLMLoss`).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch

from longva_cli.train.settings import OptimizerSettings, ParallelSettings, TrainSettings


def deepspeed_config(
    train: TrainSettings, parallel: ParallelSettings, optimizer: OptimizerSettings, world_size: int, precision: str
) -> dict[str, Any]:
    """The DeepSpeed JSON config for a recipe's sections (`precision` resolved: bf16, fp16 or fp32)."""
    zero: dict[str, Any] = {"stage": parallel.zero_stage}
    if parallel.zero_stage == 3:
        # gather full weights on save, so checkpoints are plain HF safetensors
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if parallel.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if parallel.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * world_size,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**9,  # we print our own progress
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        # a torch optimizer with optimizer offload is allowed (slower than DeepSpeedCPUAdam)
        "zero_force_ds_cpu_optimizer": False,
    }
    if optimizer.grad_clip:
        config["gradient_clipping"] = optimizer.grad_clip
    return config


def lr_lambda(schedule: str, warmup_steps: int, max_steps: int):
    """A multiplier of the peak learning rate per optimizer step (picklable via functools.partial)."""
    import functools

    return functools.partial(_lr_factor, schedule, warmup_steps, max_steps)


def _lr_factor(schedule: str, warmup_steps: int, max_steps: int, step: int) -> float:
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if schedule == "linear":
        return max(0.0, 1 - progress)
    return 1.0


def initialize(
    module: torch.nn.Module,
    *,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    eps: float,
    schedule: str,
    warmup_steps: int,
    max_steps: int,
    ds_config: dict[str, Any],
    param_groups: list[dict[str, Any]] | None = None,
):
    """A DeepSpeed engine around `module` with AdamW and a LambdaLR schedule.

    `param_groups` (optional) gives parts of the model their own peak learning rate, as
    `[{"params": [...], "lr": 2e-6}, ...]`; by default every trainable parameter uses `lr`.

    With optimizer offload DeepSpeed builds its CPU Adam (much faster than torch's on CPU
    master weights; a one-off C++ build). Otherwise we pass a torch AdamW object, which
    needs no compiled op and behaves the same on CPU and GPU.
    """
    import deepspeed

    if param_groups is None:
        param_groups = [{"params": [p for p in module.parameters() if p.requires_grad], "lr": lr}]
    # no weight decay on biases and norms, as is usual for AdamW on transformers
    groups = []
    for group in param_groups:
        params = [p for p in group["params"] if p.requires_grad]
        groups += [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay, "lr": group.get("lr", lr)},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr": group.get("lr", lr)},
        ]
    groups = [g for g in groups if g["params"]]
    optimizer = None
    if ds_config["zero_optimization"].get("offload_optimizer"):
        ds_config = dict(ds_config, optimizer={
            "type": "AdamW",
            "params": {"lr": lr, "betas": list(betas), "eps": eps, "weight_decay": weight_decay},
        })
    else:
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    factor = lr_lambda(schedule, warmup_steps, max_steps)

    def scheduler(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, factor)

    engine, _, _, lr_scheduler = deepspeed.initialize(
        model=module,
        model_parameters=groups if optimizer is None else None,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=ds_config,
    )
    return engine, lr_scheduler


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0 (None elsewhere); call on every rank."""
    import torch.distributed as dist

    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict() if dist.get_rank() == 0 else None


def quiet_libraries() -> None:
    """DeepSpeed and transformers log setup details at INFO on every rank; keep warnings only."""
    import logging

    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from deepspeed.utils import logger as deepspeed_logger

    for handler in deepspeed_logger.handlers:  # DeepSpeed logs to stdout; stdout carries results only
        if type(handler) is logging.StreamHandler:
            handler.stream = sys.stderr  # not setStream: it flushes the old stream, which may be closed
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # our own bar is the one to watch
    # DeepSpeed still calls collectives that torch 2.13 renamed; nothing for a user to act on
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
