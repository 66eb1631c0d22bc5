"""One NIAH sequence split over several processes: DeepSpeed Ulysses sequence parallelism.

For a haystack whose sequence does not fit one GPU, the p ranks of a group each hold a
contiguous 1/p of it; Ulysses attention (registered by `longva_cli.train.sequence_parallel`,
the same engine `extend-text` trains with) exchanges heads for sequence so every position
still attends to all earlier ones. The sequence is padded at its end to a multiple of p:
attention is causal, so padding changes no real position.

`ShardedForward` stands in for `PrefixCache` in teacher-forced scoring: it answers
`hidden_states(sequence, stop, keep)` with the last `keep` positions' hidden states, gathered
from the ranks that hold them. Each call runs the whole sequence (no prefix reuse).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from longva_cli.errors import LongVAError
from longva_cli.model.prefix_cache import Sequence


class ShardedForward:
    def __init__(self, language_model, state) -> None:
        self.language_model = language_model
        self.state = state
        self.forwarded = 0  # positions run through the decoder, for the cost report

    @torch.inference_mode()
    def hidden_states(self, sequence: Sequence, stop: int, keep: int) -> torch.Tensor:
        """Final hidden states [keep, d] of positions stop-keep .. stop-1 of `sequence[:stop]`."""
        from longva_cli.train.sequence_parallel import shard_indices

        degree, rank = self.state.sp_degree, self.state.sp_rank
        padded = -(-stop // degree) * degree
        index = shard_indices(padded, degree, rank)  # [padded / degree] global positions held here
        model = self.language_model
        embeds = torch.zeros(len(index), model.config.hidden_size, dtype=model.dtype, device=model.device)
        start, end = int(index[0]), min(int(index[-1]) + 1, stop)
        if end > start:
            embeds[: end - start] = sequence.embed(start, end)
        hidden = model.model(
            inputs_embeds=embeds[None], position_ids=index[None].to(model.device), use_cache=False
        ).last_hidden_state[0]  # [padded / degree, d]
        wanted = (index >= stop - keep) & (index < stop)
        mine = (index[wanted].tolist(), hidden[wanted.to(model.device)].cpu())
        gathered: list = [None] * degree
        dist.all_gather_object(gathered, mine, group=self.state.sp_group)
        rows = {position: row for positions, held in gathered for position, row in zip(positions, held)}
        self.forwarded += stop
        return torch.stack([rows[position] for position in range(stop - keep, stop)]).to(model.device)


def sharded_forward(language_model, degree: int) -> ShardedForward:
    """Join the sequence-parallel groups of `degree` ranks and route attention through Ulysses."""
    heads = language_model.config.num_key_value_heads
    if heads % degree:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0]
        raise LongVAError(
            f"Ulysses splits attention heads, and this model's {heads} KV heads do not divide by {degree}; "
            f"use --sequence-parallel in {divisors}."
        )
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's comm layer on gloo
    from longva_cli.train import sequence_parallel as sp

    state = sp.init_distributed(degree, "ulysses")
    sp.enable(language_model, state)
    return ShardedForward(language_model, state)
