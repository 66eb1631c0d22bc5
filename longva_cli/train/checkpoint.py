"""Checkpoints a user can load with `AutoModelForCausalLM` and a run can resume from exactly.

Layout of `<output_dir>/step_<N>/`:

    config.json, model*.safetensors      the HF model (with the run's rope_theta / max positions)
    tokenizer files                      so the folder is a complete model
    trainer_state.json                   step, tokens seen, recipe, last loss
    engine/state/...                     DeepSpeed ZeRO shards: optimizer, scheduler, client state
    engine/rng_rank<R>.pt                every rank's RNG state

Every checkpoint is written to `.tmp-step_<N>` and renamed when complete; only then does the
`latest` file (one line: the folder name) change, itself by atomic replace. A crash or a full
disk mid-write leaves `latest` pointing at the previous, complete checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from longva_cli.errors import LongVAError

LATEST = "latest"


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def estimate_bytes(model: torch.nn.Module, optimizer_bytes_per_param: int = 12) -> int:
    """Weights in their dtype plus fp32 master weights and two Adam moments (ZeRO's layout)."""
    total = 0
    for param in model.parameters():
        numel = getattr(param, "ds_numel", param.numel())  # ZeRO-3 parameters are empty placeholders
        total += numel * (param.element_size() + optimizer_bytes_per_param)
    return total


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(
    engine,
    output_dir: Path,
    step: int,
    *,
    client_state: dict[str, Any],
    save_model: Callable[[Path, dict[str, torch.Tensor]], None],
    state_dict: Callable[[], dict[str, torch.Tensor] | None],
    trainer_state: dict[str, Any],
    needed_bytes: int = 0,
    is_main: bool = True,
) -> Path:
    """Write checkpoint `step_<step>` atomically and point `latest` at it; returns its path.

    `save_model(folder, state_dict)` writes the HF files on the main rank; `state_dict()` is
    called on every rank (ZeRO-3 gathers the shards collectively).
    """
    output_dir = Path(output_dir)
    name = f"step_{step}"
    tmp, final = output_dir / f".tmp-{name}", output_dir / name
    free = [None]
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        free[0] = free_bytes(output_dir)
    if dist.is_initialized() and dist.get_world_size() > 1:  # every rank must stop together, or none
        dist.broadcast_object_list(free, src=0)
    if needed_bytes and free[0] < needed_bytes:
        raise LongVAError(
            f"not enough disk space for checkpoint {name} in {output_dir} (needs about {needed_bytes / 1e9:.1f} GB, "
            f"{free[0] / 1e9:.1f} GB free); free some space or set train.output_dir elsewhere, then resume from "
            f"{output_dir / LATEST}."
        )
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    try:
        engine.save_checkpoint(str(tmp / "engine"), tag="state", client_state=client_state, save_latest=False)
        torch.save(_rng_state(), tmp / "engine" / f"rng_rank{dist.get_rank() if dist.is_initialized() else 0}.pt")
        weights = state_dict()
        if is_main:
            save_model(tmp, weights)
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        _barrier()
        if is_main:
            if final.exists():  # an earlier run wrote this step: the new one replaces it
                shutil.rmtree(final)
            os.replace(tmp, final)
            pointer = output_dir / f".{LATEST}.tmp"
            pointer.write_text(name + "\n")
            os.replace(pointer, output_dir / LATEST)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            if is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise LongVAError(
                f"the disk filled up while writing checkpoint {name}; it was discarded and {output_dir / LATEST} still "
                "names the previous complete checkpoint; free some space and resume from it."
            ) from None
        raise
    _barrier()
    return final


def resolve(path: str | Path) -> Path:
    """A checkpoint folder from a step folder, or from a run folder via its `latest` file."""
    path = Path(path).expanduser()
    if (path / LATEST).is_file():
        path = path / (path / LATEST).read_text().strip()
    if not (path / "engine" / "state").is_dir():
        raise LongVAError(
            f"{path} is not a training checkpoint (no engine/state inside); pass a step_<N> folder or the run folder "
            "that holds the `latest` file."
        )
    return path


def load(engine, checkpoint: Path) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and this rank's RNG; returns the client state."""
    load_path, client_state = engine.load_checkpoint(str(checkpoint / "engine"), tag="state")
    if load_path is None:
        raise LongVAError(f"DeepSpeed could not load {checkpoint}; was it written with the same number of processes?")
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = checkpoint / "engine" / f"rng_rank{rank}.pt"
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state or {}
