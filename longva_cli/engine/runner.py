"""KV runners: how a sequence goes through the decoder, chunk by chunk, into a KV cache.

A 3000-frame video is 432K tokens. One forward over all of them would hold every layer's MLP
activations for the whole sequence (tens of GB) and seq x vocab logits (over 100 GB in float32).
Instead the sequence enters the KV cache `chunk` tokens at a time through the bare decoder; the
caller turns only the hidden states it needs into logits.

`PrefixCache` keeps what the next sequence shares with the last one. Equal keys up to a position
mean equal embeddings, hence equal keys and values in every layer, so the cache is cut back to
the longest common prefix and only the rest runs: the reuse is exact, not approximate. A fresh
`PrefixCache` is a plain chunked prefill. V-NIAH scores thousands of sequences that differ only
after the needle; an evaluation asks several questions about one video; a chat turn extends the
previous one: each runs only its new tokens.

Runners yield their work chunk by chunk; a caller that stops iterating stops the work there,
and the cache stays consistent with the keys it records.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from longva_cli.defaults import PREFILL_CHUNK
from longva_cli.engine.memory import kv_bytes_per_token
from longva_cli.engine.sequence import Sequence
from longva_cli.model.attention import prefill_chunk
from longva_cli.model.compat import cache_kwargs
from longva_cli.model.kv_cache import KVCache, kv_storage_of

DEFAULT_PREFILL_CHUNK = PREFILL_CHUNK


@dataclass
class Chunk:
    """Final hidden states of consecutive positions of a sequence."""

    start: int  # position of the first row
    hidden: torch.Tensor  # [n, d]

    @property
    def stop(self) -> int:
        return self.start + len(self.hidden)


class KVRunner(Protocol):
    """What objectives need of a runner (`PrefixCache`, or the sequence-parallel forward)."""

    language_model: torch.nn.Module
    forwarded: int  # positions run through the decoder so far, for cost reports

    def shared_with(self, sequence: Sequence) -> int:
        """How many leading positions of `sequence` are already held (0 where nothing is kept)."""
        ...

    def chunks(self, sequence: Sequence, stop: int, need_from: int) -> Iterator[Chunk]:
        """Bring the state to `sequence[:stop]`, yielding chunks that together cover at least
        positions [need_from, stop); earlier rows may be yielded too, or not."""
        ...

    def step(self, token_id: int) -> torch.Tensor:
        """Feed one token after the current state; the logits [vocab] it predicts next."""
        ...

    def reserve(self, positions: int) -> None:
        """Make room for `positions` positions in all before they come (a runner that keeps no cache ignores it)."""
        ...


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two key arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class PrefixCache:
    """A KV cache that keeps the prefix the next sequence shares with the last one.

    The keys and values live in a `KVCache` (model/kv_cache.py): preallocated, written in place,
    never copied per token, in the storage dtype `--kv-cache` set on the model (`use_kv_cache`).
    `chunks` makes room for the sequence it runs; `reserve` for what a caller will add after it
    (the tokens it may generate), so decoding never reallocates.
    """

    def __init__(self, language_model, chunk: int = DEFAULT_PREFILL_CHUNK) -> None:
        self.language_model = language_model
        self.chunk = chunk
        self.cache = KVCache.for_model(language_model.config, kv_storage_of(language_model))
        self.keys = np.empty(0, dtype=np.int64)  # keys of the positions held in the cache
        self.forwarded = 0

    def __len__(self) -> int:
        return len(self.keys)

    def shared_with(self, sequence: Sequence) -> int:
        """How many leading positions of `sequence` the cache already holds."""
        return common_prefix(self.keys, sequence.keys)

    def truncate(self, length: int) -> None:
        extra = len(self.keys) - length
        if extra > 0:
            self.cache.crop(-extra)  # transformers 5 takes the number of positions to drop
            self.keys = self.keys[:length]

    @torch.inference_mode()
    def fork(self, length: int) -> "PrefixCache":
        """A new cache holding a copy of this one's first `length` positions (this one is unchanged)."""
        twin = PrefixCache(self.language_model, self.chunk)
        twin.cache = self.cache.fork(length)
        twin.keys = self.keys[:length].copy()
        return twin

    @torch.inference_mode()
    def chunks(self, sequence: Sequence, stop: int, need_from: int) -> Iterator[Chunk]:
        reuse = min(common_prefix(self.keys, sequence.keys[:stop]), need_from)
        self.truncate(reuse)
        self.reserve(stop)
        decoder = self.language_model.model
        size = prefill_chunk(self.language_model, stop, self.chunk)
        for start in range(reuse, stop, size):
            end = min(start + size, stop)
            hidden = decoder(inputs_embeds=sequence.embed(start, end)[None], **cache_kwargs(self.cache)).last_hidden_state
            self.keys = np.concatenate([self.keys, sequence.keys[start:end]])
            self.forwarded += end - start
            yield Chunk(start, hidden[0])

    def reserve(self, positions: int) -> None:
        self.cache.reserve(positions)

    @torch.inference_mode()
    def step(self, token_id: int) -> torch.Tensor:
        token = torch.tensor([[token_id]], device=self.language_model.get_input_embeddings().weight.device)
        logits = self.language_model(input_ids=token, **cache_kwargs(self.cache)).logits
        self.keys = np.append(self.keys, np.int64(token_id))
        self.forwarded += 1
        return logits[0, -1].float()


class RunnerPool:
    """Prefix caches of recent sequences (conversations, videos), least recently used first out.

    `acquire(sequence)` hands out the cache that already holds the longest prefix of `sequence`
    (a follow-up question about the same video, the same chat plus a new turn), so only the new
    tokens are prefilled. The caches together hold at most `budget_bytes` of KV.
    """

    def __init__(self, language_model, budget_bytes: int, chunk: int = DEFAULT_PREFILL_CHUNK) -> None:
        self.language_model = language_model
        self.budget_bytes = budget_bytes
        self.chunk = chunk
        self.per_token = kv_bytes_per_token(language_model.config, kv_storage_of(language_model))
        self.runners: list[PrefixCache] = []  # least recently used first
        self.scopes: dict[PrefixCache, Hashable] = {}  # the scope each runner was acquired in

    def acquire(self, sequence: Sequence, scope: Hashable = None) -> PrefixCache:
        """The cache to run `sequence` in.

        The cache holding the longest prefix of `sequence` is used as it is when the sequence
        continues all of it (the same conversation plus a turn); when it shares at least half of
        it (another question about its video), the shared part is copied into a new cache, so
        the first conversation keeps its own; otherwise (e.g. only the system prompt is shared)
        a fresh cache is started.

        Only caches acquired in the same `scope` are reused (a server's tenant): what is reused,
        and so how fast a prompt is answered, must not tell one tenant what another sent. The
        budget is shared.
        """
        if self.budget_bytes <= 0:  # nothing is kept
            return PrefixCache(self.language_model, self.chunk)
        own = [runner for runner in self.runners if self.scopes[runner] == scope]
        best = max(own, key=lambda runner: runner.shared_with(sequence), default=None)
        shared = best.shared_with(sequence) if best is not None else 0
        if best is not None and shared == len(best):
            self.runners.remove(best)
        elif best is not None and 2 * shared >= len(best):
            best = best.fork(shared)
        else:
            best = PrefixCache(self.language_model, self.chunk)
        self.runners.append(best)
        self.scopes[best] = scope
        self._evict(keep=best, incoming=len(sequence))
        return best

    def held_bytes(self) -> int:
        return sum(len(runner) for runner in self.runners) * self.per_token

    def _evict(self, keep: PrefixCache, incoming: int) -> None:
        """Drop the least recently used caches until the budget has room for `incoming` positions."""
        while len(self.runners) > 1 and self.held_bytes() + incoming * self.per_token > self.budget_bytes:
            victim = next(runner for runner in self.runners if runner is not keep)
            self.runners.remove(victim)
            del self.scopes[victim]
