"""One sequence split over several processes: DeepSpeed Ulysses sequence parallelism.

For a sequence that does not fit one GPU (a V-NIAH haystack, a perplexity window), the p ranks
of a group each hold a contiguous 1/p of it; Ulysses attention (registered by
`longva_cli.parallel.sequence_attention`, the same engine `extend-text` trains with) exchanges heads for sequence
so every position still attends to all earlier ones. The sequence is padded at its end to a multiple of p:
attention is causal, so padding changes no real position.

`SequenceParallelRunner` is an engine KV runner (`engine.KVRunner`) for teacher-forced scoring: it
answers `chunks(sequence, stop, need_from)` with one chunk, the hidden states of positions
need_from .. stop - 1 gathered from the ranks that hold them. Each call runs the whole sequence
(no prefix reuse); generation is not offered.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longva_cli.errors import LongVAError
from longva_cli.engine.runner import Chunk, KVRunner, PrefixCache
from longva_cli.engine.sequence import Sequence


class SequenceParallelRunner:
    def __init__(self, language_model, state) -> None:
        self.language_model = language_model
        self.state = state
        self.forwarded = 0  # positions run through the decoder, for the cost report

    def shared_with(self, sequence: Sequence) -> int:
        return 0  # nothing is kept between sequences

    @torch.inference_mode()
    def chunks(self, sequence: Sequence, stop: int, need_from: int):
        """One chunk: final hidden states [stop - need_from, d] of positions need_from .. stop - 1."""
        from longva_cli.parallel.sequence_attention import shard_indices

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
        wanted = (index >= need_from) & (index < stop)
        mine = (index[wanted].tolist(), hidden[wanted.to(model.device)].cpu())
        gathered: list = [None] * degree
        dist.all_gather_object(gathered, mine, group=self.state.sp_group)
        rows = {position: row for positions, held in gathered for position, row in zip(positions, held)}
        self.forwarded += stop
        yield Chunk(need_from, torch.stack([rows[position] for position in range(need_from, stop)]).to(model.device))

    def reserve(self, positions: int) -> None:
        pass  # no cache: each sequence runs whole

    def step(self, token_id: int) -> torch.Tensor:
        raise LongVAError("generate scoring is not supported with --sequence-parallel; use --scoring teacher-forced.")


def sequence_parallel_runner(language_model, degree: int) -> SequenceParallelRunner:
    """Join the sequence-parallel groups of `degree` ranks and route attention through Ulysses."""
    heads = language_model.config.num_key_value_heads
    if heads % degree:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0]
        raise LongVAError(
            f"Ulysses splits attention heads, and this model's {heads} KV heads do not divide by {degree}; "
            f"use --sequence-parallel in {divisors}."
        )
    from longva_cli.parallel import ranks, sequence_attention

    state = ranks.init_distributed(degree, "ulysses", setting="--sequence-parallel")
    sequence_attention.enable(language_model, state)
    return SequenceParallelRunner(language_model, state)


def runner_for(language_model, settings) -> KVRunner:
    """The KV runner a command's `settings` ask for: one sequence over `settings.sequence_parallel`
    torchrun ranks when above 1, else a `PrefixCache` prefilling `settings.prefill_chunk` tokens at a time."""
    if settings.sequence_parallel > 1:
        return sequence_parallel_runner(language_model, settings.sequence_parallel)
    return PrefixCache(language_model, settings.prefill_chunk)
