"""Where this process sits among torchrun's ranks, and sequence parallelism across them.

One abstraction for every command that runs as several processes:

- `join(p)`: this rank's place from torchrun's environment, joining its process group when
  there is more than one rank (no DeepSpeed): enough for work spread over ranks, as niah's
  cells are.
- `init_distributed(p, backend)`: what training needs on top: always a process group (a world
  of one when not launched, so one code path runs everywhere), DeepSpeed's communication
  layer, and the sequence-parallel groups of `p` consecutive ranks.

Sequence parallelism splits one long sequence across the ranks of a group, with two maintained
backends plugged into transformers through `AttentionInterface` (`enable`), so a HF Qwen2 model
runs unchanged and only its attention call becomes distributed:

- `ulysses` (default; CPU/gloo and GPU): DeepSpeed's `DistributedAttention`. Each rank holds a
  contiguous slice of the sequence; an all-to-all turns (slice, all heads) into (full sequence,
  heads / degree), local attention runs on whole sequences, a second all-to-all turns it back.
  So the degree must divide the sequence length and the number of KV heads (Qwen2-7B has 4 KV
  heads: degree 1, 2 or 4; for 8 GPUs use `ring`, or Ulysses 4 with 2-way data parallelism).
- `ring` (GPU only): zigzag ring flash attention from the `ring-flash-attn` package. The
  sequence is cut into 2 x degree chunks and rank r holds chunks r and 2*degree-1-r, which
  balances causal work; any KV-head count works, the length must divide by 2 x degree.

Either way, each rank's RoPE position ids are the real positions of its tokens in the full
sequence, so the model sees exactly what one device would see. torch is imported inside the
functions, so importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from longva_cli.errors import LongVAError

if TYPE_CHECKING:
    import torch

ATTENTION_NAME = "longva_sequence_parallel"
COMM_OP = "deepspeed_shm_comm"  # what DeepSpeed JIT-builds for its CPU collectives


@dataclass
class ParallelState:
    """This process's place: global rank, its sequence-parallel group and data-parallel position."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    sp_degree: int = 1
    sp_rank: int = 0
    sp_group: Any = None
    dp_rank: int = 0
    dp_world_size: int = 1
    backend: str = "ulysses"
    created_process_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for in a world of one)."""
        import torch.distributed as dist

        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()

    def close(self) -> None:
        """Leave the process group this state created (see `shutdown`)."""
        shutdown(self)

    def device(self, requested: str = "auto") -> str:
        """This rank's device: `auto` or `cuda` on a machine with GPUs is this rank's own GPU,
        `auto` without GPUs is the CPU, anything else is kept as given."""
        import torch

        if requested in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return "cpu" if requested == "auto" else requested


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launched() -> bool:
    """Whether this process runs under a launcher (torchrun, deepspeed) or in a process group already."""
    if "WORLD_SIZE" in os.environ:
        return True
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def _check_divides(world: int, sp_degree: int, setting: str) -> None:
    if sp_degree < 1 or world % sp_degree:
        raise LongVAError(
            f"{world} processes cannot be split into sequence-parallel groups of {sp_degree}; "
            f"launch a multiple of {max(sp_degree, 1)} processes or change {setting}."
        )


def join(sp_degree: int = 1, *, timeout: timedelta | None = None, setting: str = "--sequence-parallel") -> ParallelState:
    """This rank's place from torchrun's environment, joining the process group when there are
    several ranks; a world of one creates none. No DeepSpeed and no sequence-parallel groups
    (`init_distributed` adds those).

    gloo carries the barriers (give a long `timeout` when one rank may work alone for long);
    with sequence parallelism on GPUs NCCL carries the GPU traffic.
    """
    import torch
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    _check_divides(world, sp_degree, setting)
    created = False
    if world > 1 and not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if sp_degree > 1 and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timeout)
        created = True
    return ParallelState(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        sp_degree=sp_degree,
        sp_rank=rank % sp_degree,
        dp_rank=rank // sp_degree,
        dp_world_size=world // sp_degree,
        created_process_group=created,
    )


def init_distributed(sp_degree: int = 1, backend: str = "ulysses", *, setting: str = "parallel.sequence_parallel") -> ParallelState:
    """Join (or create) the process group, start DeepSpeed's comm layer on it, and carve it
    into sequence-parallel groups.

    Launched by torchrun/deepspeed the environment names rank and world size; otherwise this
    becomes a world of one on a fresh port, so the same code path (and DeepSpeed) runs.
    Groups are consecutive ranks, so a sequence-parallel group stays inside a node when the
    degree divides the GPUs per node, and ZeRO shards across every rank.
    """
    import torch
    import torch.distributed as dist

    # checked before joining, so a refused layout leaves no process group behind
    _check_divides(dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1")), sp_degree, setting)
    created = False
    if not dist.is_initialized():
        backend_name = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if "WORLD_SIZE" in os.environ:  # torchrun / deepspeed launcher
            dist.init_process_group(backend_name)
        else:  # a world of one on a fresh port, leaving the environment as it was
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed reads it
            dist.init_process_group(backend_name, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        created = True
    rank, world = dist.get_rank(), dist.get_world_size()
    _start_deepspeed_comm(rank)
    group = None
    for start in range(0, world, sp_degree):  # every rank must create every group, in order
        ranks = list(range(start, start + sp_degree))
        new = dist.new_group(ranks) if sp_degree > 1 else None
        if rank in ranks:
            group = new
    return ParallelState(
        rank=rank,
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", rank)),
        sp_degree=sp_degree,
        sp_rank=rank % sp_degree,
        sp_group=group,
        dp_rank=rank // sp_degree,
        dp_world_size=world // sp_degree,
        backend=backend,
        created_process_group=created,
    )


# ---------------------------------------------------------------- DeepSpeed's comm layer


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


def _start_deepspeed_comm(rank: int) -> None:
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


def shutdown(state: ParallelState) -> None:
    """Leave the process group we created and forget DeepSpeed's cached groups.

    Destroying the group at the end avoids sporadic aborts at exit with gloo; clearing
    DeepSpeed's module-level caches lets a second run in the same process (tests, notebooks)
    start from a clean slate instead of holding groups of a destroyed world.
    """
    _ACTIVE.clear()
    if not state.created_process_group:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    if "deepspeed" not in sys.modules:  # `join` alone never started DeepSpeed
        return
    import deepspeed.comm.comm as ds_comm
    from deepspeed.utils import groups

    ds_comm.cdb = None
    for name, value in vars(groups).copy().items():
        if name.startswith("_") and name.endswith(("_GROUP", "_GROUP_RANKS")) and name.isupper():
            setattr(groups, name, {} if isinstance(value, dict) else None)
    groups.mpu = None


def check_layout(seq_len: int, degree: int, backend: str, num_kv_heads: int) -> None:
    """Raise a LongVAError when the sequence or the heads cannot be split `degree` ways."""
    if degree < 1:
        raise LongVAError("parallel.sequence_parallel must be at least 1.")
    if degree == 1:
        return
    parts = 2 * degree if backend == "ring" else degree
    if seq_len % parts:
        below, above = seq_len - seq_len % parts, seq_len - seq_len % parts + parts
        what = f"2 x {degree} zigzag chunks" if backend == "ring" else f"{degree} ranks"
        raise LongVAError(
            f"data.seq_len {seq_len} cannot be split evenly into {what}; use data.seq_len={below} "
            f"or {above}, or a sequence_parallel degree that divides {seq_len}."
        )
    if backend == "ulysses" and num_kv_heads % degree:
        divisors = [d for d in range(1, num_kv_heads + 1) if num_kv_heads % d == 0]
        raise LongVAError(
            f"Ulysses shards attention heads, and this model's {num_kv_heads} KV heads do not divide "
            f"by {degree}; use parallel.sequence_parallel in {divisors} (with data parallelism for the "
            f"other GPUs) or parallel.backend=ring on GPUs."
        )


def shard_indices(seq_len: int, degree: int, rank: int, backend: str = "ulysses") -> torch.Tensor:
    """Global token positions this rank holds: one contiguous slice, or two zigzag chunks."""
    import torch

    if backend == "ring" and degree > 1:
        chunk = seq_len // (2 * degree)
        first = torch.arange(rank * chunk, (rank + 1) * chunk)
        second_start = (2 * degree - 1 - rank) * chunk
        return torch.cat([first, torch.arange(second_start, second_start + chunk)])
    part = seq_len // degree
    return torch.arange(rank * part, (rank + 1) * part)


def shard(tokens: torch.Tensor, state: ParallelState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs, labels and position ids of this rank, from rows of L+1 tokens ([batch, L+1]).

    Labels are shifted before splitting, so the last token of a slice is still trained on
    the first token of the next slice.
    """
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    index = shard_indices(inputs.shape[1], state.sp_degree, state.sp_rank, state.backend)
    positions = index.unsqueeze(0).expand(inputs.shape[0], -1)
    return inputs[:, index], labels[:, index], positions


# ---------------------------------------------------------------- attention backends

_ACTIVE: dict[str, Any] = {}


def _local_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention over whole sequences, layout [batch, seq, heads, dim] in and out.

    Also the `local_attention` DeepSpeed's DistributedAttention calls between its all-to-alls.
    """
    import torch

    if query.is_cuda and _flash_attn() is not None:
        return _flash_attn()(query, key, value, softmax_scale=scale, causal=True)
    out = torch.nn.functional.scaled_dot_product_attention(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        is_causal=True,
        scale=scale,
        enable_gqa=key.shape[2] != query.shape[2],
    )
    return out.transpose(1, 2)


def _flash_attn():
    if "flash" not in _ACTIVE:
        try:
            from flash_attn import flash_attn_func
        except ImportError:
            flash_attn_func = None
        _ACTIVE["flash"] = flash_attn_func
    return _ACTIVE["flash"]


def _attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention hook: query/key/value arrive as [batch, heads, local seq, dim]."""
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # -> [batch, local seq, heads, dim]
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    state: ParallelState | None = _ACTIVE.get("state")
    if state is None or state.sp_degree == 1:
        out = _local_attention(q, k, v, scale)
    elif state.backend == "ring":
        out = _ACTIVE["ring"](q, k, v, softmax_scale=scale, causal=True, group=state.sp_group)
    else:
        out = _ACTIVE["ulysses"](q, k, v, 0, None, scale)  # batch_dim_idx=0, no fused rotary
    return out, None


def enable(model, state: ParallelState) -> None:
    """Route `model`'s attention through the sequence-parallel backend of `state`.

    With no attention mask registered for this implementation, transformers builds none and
    the hook attends causally over whole sequences (rows are packed without document masks).
    """
    import torch
    from transformers import AttentionInterface

    _ACTIVE["state"] = state
    if state.sp_degree > 1 and state.backend == "ring":
        if not torch.cuda.is_available():
            raise LongVAError("parallel.backend=ring needs CUDA GPUs; use parallel.backend=ulysses on CPU.")
        try:
            from ring_flash_attn import zigzag_ring_flash_attn_func
        except ImportError:
            raise LongVAError(
                "parallel.backend=ring needs the ring-flash-attn package; `pip install ring-flash-attn flash-attn`."
            ) from None
        _ACTIVE["ring"] = zigzag_ring_flash_attn_func
    elif state.sp_degree > 1:
        from deepspeed.sequence.layer import DistributedAttention

        # [batch, seq/p, heads, dim] -> scatter heads (dim 2), gather sequence (dim 1)
        _ACTIVE["ulysses"] = DistributedAttention(_local_attention, state.sp_group, scatter_idx=2, gather_idx=1)
    AttentionInterface.register(ATTENTION_NAME, _attention_forward)
    model.config._attn_implementation = ATTENTION_NAME
    for sub in model.modules():  # sub-configs, if any, share the choice
        config = getattr(sub, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = ATTENTION_NAME
