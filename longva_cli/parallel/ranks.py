"""Where this process sits among torchrun's ranks.

- `join(p)`: this rank's place from torchrun's environment, joining its process group when
  there is more than one rank (no DeepSpeed): enough for work spread over ranks (niah, ppl).
- `init_distributed(p, backend)`: what training needs on top: always a process group (a world
  of one when not launched, so one code path runs everywhere), DeepSpeed's communication
  layer (`deepspeed_comm`), and the sequence-parallel groups of `p` consecutive ranks
  (`sequence_attention` runs attention across them).

torch is imported inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from longva_cli.errors import LongVAError
from longva_cli.parallel import deepspeed_comm

# How long a rank waits at a barrier while another works alone: in niah rank 0 may spend an
# hour embedding the haystack, in ppl tokenizing a large data set.
BARRIER_TIMEOUT = timedelta(days=7)


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


def join(sp_degree: int = 1, *, timeout: timedelta = BARRIER_TIMEOUT, setting: str = "--sequence-parallel") -> ParallelState:
    """This rank's place from torchrun's environment, joining the process group when there are
    several ranks; a world of one creates none. No DeepSpeed and no sequence-parallel groups
    (`init_distributed` adds those).

    With sequence parallelism of degree p, consecutive groups of p ranks work on the same
    sequences together (niah and ppl spread their work over the groups, and the first rank of
    each writes). gloo carries the barriers; with sequence parallelism on GPUs NCCL carries the
    GPU traffic.
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
    deepspeed_comm.start(rank)
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


def shutdown(state: ParallelState) -> None:
    """Leave the process group we created and forget DeepSpeed's cached groups.

    Destroying the group at the end avoids sporadic aborts at exit with gloo; clearing
    DeepSpeed's module-level caches lets a second run in the same process (tests, notebooks)
    start from a clean slate instead of holding groups of a destroyed world.
    """
    if not state.created_process_group:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    deepspeed_comm.forget_groups()
