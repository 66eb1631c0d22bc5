"""DeepSpeed's communication layer on the process group this rank joined, and its output.

On CPUs DeepSpeed compiles a communication op the first time it starts (about a minute); it
is built into a per-user cache (`extension_cache`) and announced on stderr. DeepSpeed prints
its notices with `print`; `DeepSpeedChatter` keeps them off stdout, which carries results.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

COMM_OP = "deepspeed_shm_comm"  # what DeepSpeed JIT-builds for its CPU collectives


def extension_cache() -> Path:
    """Where torch builds DeepSpeed's ops: $TORCH_EXTENSIONS_DIR, else a per-user cache folder
    (`$XDG_CACHE_HOME` or `~/.cache`, then `longva/torch_extensions/py<version>_<cpu|cuXYZ>`),
    the same for an editable and a regular install."""
    import torch

    if "TORCH_EXTENSIONS_DIR" in os.environ:
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    build = f"py{sys.version_info.major}{sys.version_info.minor}_" + (
        f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    )
    return cache / "longva" / "torch_extensions" / build


def comm_op_needs_build() -> bool:
    """Whether starting DeepSpeed on this machine will compile its CPU communication op first.

    Only the CPU accelerator uses it, and only when g++ and ninja make it buildable; a build
    already in `extension_cache()` is reused.
    """
    import torch

    if torch.cuda.is_available():
        return False
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed's import prints a guess on stdout
    import deepspeed.ops

    if not deepspeed.ops.__compatible_ops__.get(COMM_OP, False):
        return False
    return not (extension_cache() / COMM_OP / f"{COMM_OP}.so").is_file()


class DeepSpeedChatter(io.TextIOBase):
    """A stand-in for stdout while DeepSpeed runs: stdout carries results only.

    DeepSpeed prints "DeepSpeed ... built successfully" on every start (with `print`); those
    lines are dropped, any other line goes to `target` (stderr).
    """

    def __init__(self, target) -> None:
        self.target, self.pending = target, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if not (line.startswith("DeepSpeed ") and line.endswith("built successfully")):
                self.target.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self.pending:
            self.write("\n")
        self.target.flush()


def start(rank: int) -> None:
    """DeepSpeed's comm layer on the joined group. On CPUs it loads (the first time: compiles,
    about a minute) its communication op: built into `extension_cache()`, announced on stderr,
    and its notices kept off stdout."""
    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ["TORCH_EXTENSIONS_DIR"] = str(extension_cache())
    if rank == 0 and comm_op_needs_build():
        from longva_cli.console import stderr

        stderr.print(f"compiling DeepSpeed's CPU communication op, once; ~1 min (into {extension_cache()})")
    import deepspeed

    with contextlib.redirect_stdout(DeepSpeedChatter(sys.stderr)):
        # DeepSpeed's own comm layer (used by its all-to-all) wraps the torch group we joined
        deepspeed.init_distributed(dist_backend=dist.get_backend())


def forget_groups() -> None:
    """Clear DeepSpeed's module-level caches of groups once the world they belong to is gone."""
    if "deepspeed" not in sys.modules:  # `join` alone never started DeepSpeed
        return
    import deepspeed.comm.comm as ds_comm
    from deepspeed.utils import groups

    ds_comm.cdb = None
    for name, value in vars(groups).copy().items():
        if name.startswith("_") and name.endswith(("_GROUP", "_GROUP_RANKS")) and name.isupper():
            setattr(groups, name, {} if isinstance(value, dict) else None)
    groups.mpu = None
