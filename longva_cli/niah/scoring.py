"""Scoring one needle sequence, with a KV cache shared between consecutive sequences.

The original ran one full forward per (cell, needle) and took logits at every position; at
3000 frames that is 432K x 152K logits, which is why it needed eight GPUs. Here:

- logits are computed only where they are read: the answer positions (teacher-forced) or
  the last prompt position and the generated tokens (generate);
- the KV cache of the longest prefix a sequence shares with the previous one is kept and the
  rest is cropped away. Every position carries a key (a token id, or the id of a frame token)
  and equal keys up to a position mean equal embeddings, so equal keys and values: reuse is
  exact, not approximate. V-NIAH's cells are ordered so that the shared prefix (system prompt
  + the haystack frames before the needle) grows monotonically;
- the remainder goes through the decoder in chunks (memory tracks the KV cache).

`naive_*` are the reference: one plain forward over the whole sequence.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

from longva_cli.model.generation import bounded_chunk


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
            decoder(inputs_embeds=sequence.embed(start, end)[None], cache=self.cache, use_cache=True)
        hidden = decoder(inputs_embeds=sequence.embed(stop - keep, stop)[None], cache=self.cache, use_cache=True)
        self.forwarded += stop - reuse
        self.keys = sequence.keys[:stop].copy()
        return hidden.last_hidden_state[0]  # [keep, d]


@torch.inference_mode()
def teacher_forced(cache: PrefixCache, sequence: Sequence, answer_ids: list[int]) -> list[int]:
    """Argmax ids at the positions that predict each answer token (the sequence ends with the answer).

    Position i predicts token i + 1, so the answer's A tokens are predicted by the A positions
    before the last one; the last answer token itself is never fed.
    """
    total, count = len(sequence), len(answer_ids)
    hidden = cache.hidden_states(sequence, stop=total - 1, keep=count)  # [A, d]
    logits = cache.language_model.lm_head(hidden)  # [A, vocab]
    return logits.argmax(-1).tolist()


@torch.inference_mode()
def greedy(cache: PrefixCache, sequence: Sequence, stop_ids: set[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding after the prompt `sequence` (up to a stop id, not included)."""
    model = cache.language_model
    total = len(sequence)
    hidden = cache.hidden_states(sequence, stop=total, keep=1)
    logits = model.lm_head(hidden)[-1]  # [vocab]
    generated: list[int] = []
    for _ in range(max_new_tokens):
        token = int(logits.argmax())
        if token in stop_ids:
            break
        generated.append(token)
        step = model(input_ids=torch.tensor([[token]], device=model.device), cache=cache.cache, use_cache=True)
        cache.forwarded += 1
        logits = step.logits[0, -1]
    # the generated tokens are not part of any later prompt: drop them from the cache
    extra = cache.cache.get_seq_length() - total
    if extra > 0:
        cache.cache.crop(-extra)
    return generated


@torch.inference_mode()
def naive_teacher_forced(language_model, embeds: torch.Tensor, answer_count: int) -> list[int]:
    """The original's rule on a full forward: logits at every position, argmax at the answer's."""
    total = embeds.shape[0]
    logits = language_model(inputs_embeds=embeds[None]).logits[0]  # [seq, vocab]
    return logits[total - answer_count - 1 : total - 1].argmax(-1).tolist()


def normalise(text: str) -> list[str]:
    """Lower-case words without punctuation: 'The answer is (B).' -> ['the', 'answer', 'is', 'b']."""
    return re.sub(r"[^\w]+", " ", text.lower()).split()


def answer_matches(predicted: str, answer: str) -> bool:
    """Generate scoring: the answer's words appear in the prediction, in order.

    A one-letter answer (an option letter) must be the prediction's first word: a bare 'a'
    inside a sentence is an article, not option A.
    """
    said, wanted = normalise(predicted), normalise(answer)
    if not wanted:
        return False
    if len(wanted) == 1 and len(wanted[0]) == 1 and wanted[0].isalpha():
        return bool(said) and said[0] == wanted[0]
    width = len(wanted)
    return any(said[i : i + width] == wanted for i in range(len(said) - width + 1))
