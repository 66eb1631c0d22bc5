"""Checkpoints a user can load with `AutoModelForCausalLM` and a run can resume from exactly.

Layout of `<output_dir>/step_<N>/`:

    config.json, model*.safetensors      the HF model (with the run's rope_theta / max positions)
    tokenizer files                      so the folder is a complete model
    trainer_state.json                   step, tokens seen, recipe, last loss
    engine/state/...                     DeepSpeed ZeRO shards: optimizer, scheduler, client state
    engine/rng_rank<R>.pt                every rank's RNG state

Every checkpoint is written to `.tmp-step_<N>` and renamed when complete; only then does the
`latest` file (one line: the folder name) change, itself by atomic replace. A crash or a full
disk mid-write leaves `latest` pointing at the previous, complete checkpoint; a failed write
removes its partial folder, and the next save removes any a crash left.

Resuming never runs code from the files: a run folder may come from someone else, and a
pickle can call anything when loaded. Every `.pt` file is scanned first (a file holding other
objects than tensors, plain values and the few DeepSpeed classes its optimizer state uses is
refused, by name), then loaded with `weights_only=True`, DeepSpeed's own loads included (it
asks for `weights_only=False`; torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides that while we
load). RNG states are stored as tensors and plain values for that reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError

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
    """Every RNG's state as tensors and plain values, which `weights_only` loading accepts."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state["state"]["key"] = numpy_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state(numpy_state)  # a dict, or the (name, keys, ...) tuple of checkpoints before it
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _safe_globals() -> list:
    """What a checkpoint may hold beside tensors and plain values: the classes DeepSpeed's ZeRO
    optimizer state pickles (plain data, no code runs to rebuild them), and numpy arrays, which
    RNG files of earlier releases hold."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler, LossScalerBase
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    rebuild_array = np.empty(0).__reduce__()[0]  # numpy's _reconstruct, wherever this numpy keeps it
    numpy_types = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), rebuild_array]  # the legacy MT19937 state is a uint32 array
    return [fragment_address, ZeroStageEnum, LossScalerBase, LossScaler, DynamicLossScaler, *numpy_types]


def _global_name(item) -> str:
    return f"{item.__module__}.{item.__qualname__}"


def check_loadable(checkpoint: Path) -> None:
    """Refuse a checkpoint whose `.pt` files hold anything but tensors, plain values and the
    allowed classes (a pickle can run any code when loaded), or that are damaged; one sentence
    naming the file. Nothing is unpickled here: torch lists the globals a file would import."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    allowed = {_global_name(item) for item in _safe_globals()}
    for file in sorted(Path(checkpoint).rglob("*.pt")):
        try:
            unsafe = [name for name in get_unsafe_globals_in_checkpoint(file) if name not in allowed]
        except Exception as err:  # noqa: BLE001 - torch raises RuntimeError or pickle errors for a damaged archive
            detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise LongVAError(
                f"{file} is damaged and cannot be read ({detail}); resume from an earlier step_<N> folder of the run."
            ) from None
        if unsafe:
            raise LongVAError(
                f"refusing to resume from {checkpoint}: {file} holds Python objects that would run code when loaded "
                f"({', '.join(unsafe[:3])}); it was not written by longva, or was changed since. Resume only from a run folder you trust."
            )


@contextlib.contextmanager
def weights_only_loading() -> Iterator[None]:
    """Every torch.load inside unpickles only tensors, plain values and `_safe_globals()`,
    DeepSpeed's too (it passes weights_only=False, which TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides)."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            yield
    finally:
        if previous is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


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
        for partial in output_dir.glob(".tmp-step_*"):  # a crash's partial checkpoint holds space this one needs
            shutil.rmtree(partial, ignore_errors=True)
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
            _publish(tmp, final, output_dir)
    except (OSError, RuntimeError, SafetensorError) as err:  # a full disk: each writer says it its own way
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = err.strerror if isinstance(err, OSError) and err.strerror else (str(err).strip().splitlines() or [type(err).__name__])[-1]
        raise LongVAError(
            f"writing checkpoint {name} failed ({reason}); the partial checkpoint was removed and {output_dir / LATEST} "
            "still names the previous complete one: free some space and resume from it."
        ) from None
    _barrier()
    return final


def _publish(tmp: Path, final: Path, output_dir: Path) -> None:
    """Rename the finished checkpoint into place, then point `latest` at it. A step written
    before (a run resumed from an earlier step) is moved aside first and deleted last, so at no
    moment does `latest` name a folder that is being deleted."""
    from longva_cli.engine.runs import write_atomic

    replaced = output_dir / f".old-{final.name}"
    if final.exists():
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(tmp, final)
    write_atomic(output_dir / LATEST, final.name + "\n")
    shutil.rmtree(replaced, ignore_errors=True)


def resolve(path: str | Path) -> Path:
    """A checkpoint folder from a step folder, or from a run folder via its `latest` file."""
    path = Path(path).expanduser()
    if (path / LATEST).is_file():
        named = (path / LATEST).read_bytes().decode("utf-8", "replace").strip()
        if not re.fullmatch(r"step_\d+", named):  # a name, never a path out of the run folder
            raise LongVAError(f"{path / LATEST} should name a step_<N> folder but holds {named[:40]!r}; pass a step_<N> folder to --resume.")
        path = path / named
    if not (path / "engine" / "state").is_dir():
        raise LongVAError(
            f"{path} is not a training checkpoint (no engine/state inside); pass a step_<N> folder or the run folder "
            "that holds the `latest` file."
        )
    return path


def load(engine, checkpoint: Path) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and this rank's RNG; returns the client state.
    Nothing in the files can run code (see the module docstring)."""
    checkpoint = Path(checkpoint)
    check_loadable(checkpoint)
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = checkpoint / "engine" / f"rng_rank{rank}.pt"
    try:
        with weights_only_loading():
            load_path, client_state = engine.load_checkpoint(str(checkpoint / "engine"), tag="state")
            rng_state = torch.load(rng_file, weights_only=True) if rng_file.exists() else None
    except pickle.UnpicklingError as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LongVAError(f"refusing to resume from {checkpoint}: a file in it holds objects other than tensors and plain values ({detail}).") from None
    except (RuntimeError, EOFError, OSError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LongVAError(
            f"DeepSpeed could not load {checkpoint} ({detail}); resume with the number of processes that wrote it, "
            "or from an earlier step_<N> folder if this one is damaged."
        ) from None
    if load_path is None:
        raise LongVAError(f"DeepSpeed could not load {checkpoint}; was it written with the same number of processes?")
    if rng_state is not None:
        _set_rng_state(rng_state)
    return client_state or {}
