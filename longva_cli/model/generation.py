"""Prefill in chunks, then decode one token at a time: memory tracks the KV cache, not the input.

A 3000-frame video is 432K tokens. One forward over all of them would hold every layer's MLP
activations for the whole sequence (tens of GB) and `seq x vocab` logits (over 100 GB in
float32). Instead the sequence enters the KV cache `chunk` tokens at a time through the bare
decoder, and the vocabulary projection runs for the last position only.

Sampling uses transformers' own logits processors in the order `generate` applies them
(repetition penalty, temperature, top-k, top-p), then softmax and `torch.multinomial`, so a
seed gives the same tokens as the original's `model.generate(..., do_sample=True)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from longva_cli.model.compat import cache_kwargs

DEFAULT_PREFILL_CHUNK = 4096


@dataclass
class SamplingSettings:
    """temperature 0 means greedy decoding; the original demo sampled at 0.5."""

    max_new_tokens: int = 1024
    temperature: float = 0.5
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = 0

    def processors(self) -> LogitsProcessorList:
        chain = LogitsProcessorList()
        if self.repetition_penalty not in (None, 1.0):
            chain.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.temperature > 0:
            if self.temperature != 1.0:
                chain.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k:
                chain.append(TopKLogitsWarper(self.top_k))
            if self.top_p is not None and self.top_p < 1.0:
                chain.append(TopPLogitsWarper(self.top_p))
        return chain


@torch.inference_mode()
def prefill(language_model, embeds: torch.Tensor, chunk: int = DEFAULT_PREFILL_CHUNK) -> tuple[DynamicCache, torch.Tensor]:
    """Run [seq, d] embeddings into a fresh KV cache; return it and the last position's logits [vocab]."""
    cache = DynamicCache(config=language_model.config)
    decoder = language_model.model
    chunk = bounded_chunk(language_model, embeds.shape[0], chunk)
    hidden = None
    for start in range(0, embeds.shape[0], chunk):
        piece = embeds[start : start + chunk].unsqueeze(0)  # [1, chunk, d]
        hidden = decoder(inputs_embeds=piece, **cache_kwargs(cache)).last_hidden_state
    logits = language_model.lm_head(hidden[:, -1:])  # [1, 1, vocab]
    return cache, logits[0, -1].float()


def bounded_chunk(language_model, total: int, requested: int) -> int:
    """The prefill chunk to use for a `total`-token sequence (see `attention.prefill_chunk`)."""
    from longva_cli.model.attention import prefill_chunk

    return prefill_chunk(language_model, total, requested)


@torch.inference_mode()
def decode(language_model, cache, logits: torch.Tensor, sampling: SamplingSettings, stop_ids: set[int]) -> Iterator[int]:
    """Token ids generated from a filled KV cache and its last position's logits [vocab], up to a stop id (not yielded)."""
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    processors = sampling.processors()
    generated = torch.empty((1, 0), dtype=torch.long, device=logits.device)
    for _ in range(sampling.max_new_tokens):
        scores = processors(generated, logits[None])  # [1, vocab]
        if sampling.temperature > 0:
            token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)[0, 0]
        else:
            token = scores[0].argmax()
        token_id = int(token)
        if token_id in stop_ids:
            return
        yield token_id
        generated = torch.cat([generated, token.view(1, 1)], dim=1)
        step = language_model(input_ids=token.view(1, 1).to(language_model.device), **cache_kwargs(cache))
        logits = step.logits[0, -1].float()


@torch.inference_mode()
def generate(
    language_model,
    embeds: torch.Tensor,
    sampling: SamplingSettings,
    stop_ids: set[int],
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    on_prefilled: Callable[[], None] | None = None,
) -> Iterator[int]:
    """Token ids generated after the [seq, d] prompt embeddings, up to a stop id (not yielded)."""
    cache, logits = prefill(language_model, embeds, prefill_chunk)
    if on_prefilled:
        on_prefilled()
    yield from decode(language_model, cache, logits, sampling, stop_ids)


def stream_text(tokenizer, token_ids: Iterator[int]) -> Iterator[tuple[int, str]]:
    """(token id, new text) pairs; text is held back while it ends inside a multi-byte character."""
    ids: list[int] = []
    shown = 0
    for token_id in token_ids:
        ids.append(token_id)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            yield token_id, ""
            continue
        yield token_id, text[shown:]
        shown = len(text)
