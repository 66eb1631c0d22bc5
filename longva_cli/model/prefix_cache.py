"""A KV cache that keeps the prefix consecutive prompts share, so it is computed once.

V-NIAH scores thousands of sequences that differ only after the needle; an evaluation asks
several questions about one video. Each prompt is a `Sequence`: a key per position and a way
to embed any slice. Equal keys up to a position mean equal embeddings, hence equal keys and
values in every layer, so the cache is cut back to the longest common prefix and only the
rest is run: the reuse is exact, not approximate.

Keys: text positions use their token id; visual positions use numbers no token id takes
(negative ones in `LongVA.prompt_sequence`, ranges past the vocabulary in V-NIAH) that tell
them apart within everything one `PrefixCache` sees, e.g. one cache per video.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

from longva_cli.model.compat import cache_kwargs
from longva_cli.model.generation import SamplingSettings, bounded_chunk, decode


@dataclass
class Sequence:
    """One input sequence: a key per position and a way to embed any slice of it."""

    keys: np.ndarray  # [seq] int64; equal keys at equal positions mean equal embeddings
    embed: Callable[[int, int], torch.Tensor]  # (start, stop) -> [stop - start, d]

    def __len__(self) -> int:
        return len(self.keys)


def pieces_sequence(pieces: list[tuple[np.ndarray, torch.Tensor]]) -> Sequence:
    """A sequence made of (keys [n], embeddings [n, d]) pieces laid end to end (no copy)."""
    keys = np.concatenate([k for k, _ in pieces])
    bounds = np.cumsum([0] + [len(k) for k, _ in pieces])

    def embed(start: int, stop: int) -> torch.Tensor:
        parts = []
        for (_, embeds), lo, hi in zip(pieces, bounds[:-1], bounds[1:]):
            if hi > start and lo < stop:
                parts.append(embeds[max(start, lo) - lo : min(stop, hi) - lo])
        return torch.cat(parts)

    return Sequence(keys, embed)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two key arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class PrefixCache:
    """A KV cache that keeps what the next sequence shares with the last one."""

    def __init__(self, language_model, chunk: int = 4096) -> None:
        self.language_model = language_model
        self.chunk = chunk
        self.cache = DynamicCache(config=language_model.config)
        self.keys = np.empty(0, dtype=np.int64)  # keys of the positions held in the cache
        self.forwarded = 0  # positions run through the decoder, for the cost report

    def truncate(self, length: int) -> None:
        extra = len(self.keys) - length
        if extra > 0:
            self.cache.crop(-extra)  # transformers 5 takes the number of positions to drop
            self.keys = self.keys[:length]

    @torch.inference_mode()
    def hidden_states(self, sequence: Sequence, stop: int, keep: int) -> torch.Tensor:
        """Bring the cache to `sequence[:stop]`; return final hidden states of the last `keep` positions [keep, d]."""
        reuse = min(common_prefix(self.keys, sequence.keys[:stop]), stop - keep)
        self.truncate(reuse)
        decoder = self.language_model.model
        chunk = bounded_chunk(self.language_model, stop, self.chunk)
        for start in range(reuse, stop - keep, chunk):
            end = min(start + chunk, stop - keep)
            decoder(inputs_embeds=sequence.embed(start, end)[None], **cache_kwargs(self.cache))
        hidden = decoder(inputs_embeds=sequence.embed(stop - keep, stop)[None], **cache_kwargs(self.cache))
        self.forwarded += stop - reuse
        self.keys = sequence.keys[:stop].copy()
        return hidden.last_hidden_state[0]  # [keep, d]

    def forget_after(self, length: int) -> None:
        """Drop positions past `length` that are not part of any prompt (e.g. generated tokens)."""
        extra = self.cache.get_seq_length() - length
        if extra > 0:
            self.cache.crop(-extra)


@torch.inference_mode()
def generate_after(
    prefix: PrefixCache,
    sequence: Sequence,
    sampling: SamplingSettings,
    stop_ids: set[int],
    on_prefilled: Callable[[], None] | None = None,
) -> Iterator[int]:
    """Token ids generated after the prompt `sequence`, reusing the cached prefix it shares with
    the previous prompt; the generated tokens leave the cache afterwards."""
    total = len(sequence)
    hidden = prefix.hidden_states(sequence, stop=total, keep=1)  # [1, d]
    logits = prefix.language_model.lm_head(hidden)[-1].float()  # [vocab]
    if on_prefilled:
        on_prefilled()
    try:
        yield from decode(prefix.language_model, prefix.cache, logits, sampling, stop_ids)
    finally:
        prefix.forget_after(total)
