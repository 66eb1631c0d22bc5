"""Mask-free SDPA (`longva_cli.model.attention`): chunked prefill equals one full pass, no dense mask."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from longva_cli.model import attention
from longva_cli.model.compat import cache_kwargs


def qwen2(kv_heads: int, implementation: str, seed: int = 0) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=kv_heads, max_position_embeddings=4096, rope_theta=1e6,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM._from_config(copy.deepcopy(config), attn_implementation=implementation).eval()


def chunked_logits(model, embeds: torch.Tensor, chunk: int, prefix: int = 0) -> torch.Tensor:
    """Logits [seq, vocab] of `embeds` [1, seq, d] fed `prefix` tokens first, then `chunk` at a time."""
    cache = DynamicCache(config=model.config)
    bounds = ([0, prefix] if prefix else [0]) + list(range(prefix + chunk, embeds.shape[1], chunk)) + [embeds.shape[1]]
    pieces = []
    with torch.no_grad():
        for start, stop in zip(bounds[:-1], bounds[1:]):
            pieces.append(model(inputs_embeds=embeds[:, start:stop], **cache_kwargs(cache)).logits)
    return torch.cat(pieces, dim=1)[0]


@pytest.mark.parametrize("kv_heads", [8, 2, 1])  # multi-head, grouped (GQA 4:1), multi-query
@pytest.mark.parametrize("chunk,prefix", [(1, 0), (7, 0), (64, 0), (50, 123), (300, 0)])
def test_chunked_mask_free_prefill_matches_one_full_pass(kv_heads, chunk, prefix):
    reference = qwen2(kv_heads, "eager")
    model = qwen2(kv_heads, "sdpa")
    model.load_state_dict(reference.state_dict())
    assert attention.use_mask_free_attention(model) == attention.MASK_FREE_SDPA
    embeds = torch.randn(1, 300, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = reference(inputs_embeds=embeds).logits[0]  # one pass, no cache
    torch.testing.assert_close(chunked_logits(model, embeds, chunk, prefix), full, rtol=1e-4, atol=1e-4)


def test_chunks_after_a_prefix_build_no_mask_and_attend_lower_right(monkeypatch):
    model = qwen2(2, "sdpa")
    attention.use_mask_free_attention(model)
    masks, lower_right = [], []
    forward = attention.mask_free_sdpa_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        masks.append(attention_mask)
        return forward(module, query, key, value, attention_mask, **kwargs)

    real_lower_right = attention.lower_right_causal_attention

    def count(query, key, value, **kwargs):
        lower_right.append((query.shape[2], key.shape[2]))
        return real_lower_right(query, key, value, **kwargs)

    monkeypatch.setitem(attention.AttentionInterface._global_mapping, attention.MASK_FREE_SDPA, spy)
    monkeypatch.setattr(attention, "lower_right_causal_attention", count)
    chunked_logits(model, torch.randn(1, 96, 64), chunk=32)
    assert masks and all(mask is None for mask in masks)
    # the first chunk is plain causal (q == k); the next two attend to a cached prefix
    assert lower_right == [(32, 64)] * 2 + [(32, 96)] * 2  # two layers each


def test_masks_stay_under_the_budget_on_devices_whose_kernels_need_one(monkeypatch):
    model = qwen2(2, "sdpa")
    attention.use_mask_free_attention(model)
    budget = 40 * 200  # rows x keys: forces blocks of 40 query rows at 200 keys
    monkeypatch.setitem(attention.MASK_ELEMENTS, "cpu", budget)
    sizes = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def record(query, key, value, attn_mask=None, **kwargs):
        if attn_mask is not None:
            sizes.append(attn_mask.numel())
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", record)
    embeds = torch.randn(1, 200, 64)
    reference = qwen2(2, "eager")
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        full = reference(inputs_embeds=embeds).logits[0]
    torch.testing.assert_close(chunked_logits(model, embeds, chunk=100), full, rtol=1e-4, atol=1e-4)
    assert sizes and max(sizes) <= budget


def test_padded_batches_keep_transformers_mask():
    reference = qwen2(2, "sdpa")
    model = qwen2(2, "sdpa")
    model.load_state_dict(reference.state_dict())
    attention.use_mask_free_attention(model)
    embeds = torch.randn(2, 40, 64)
    padding = torch.ones(2, 40, dtype=torch.long)
    padding[1, :10] = 0  # left padding in the second row
    with torch.no_grad():
        ours = model(inputs_embeds=embeds, attention_mask=padding).logits
        theirs = reference(inputs_embeds=embeds, attention_mask=padding).logits
    torch.testing.assert_close(ours[:, 10:], theirs[:, 10:], rtol=1e-5, atol=1e-5)


def test_prefill_chunk_stays_whole_without_a_dense_mask():
    model = qwen2(2, "sdpa")
    assert attention.prefill_chunk(model, 74_000, 4096) == (1 << 26) // 74_000  # transformers' SDPA: mask-bounded
    assert attention.prefill_chunk(model, 10**9, 4096) == 128
    attention.use_mask_free_attention(model)
    assert attention.prefill_chunk(model, 432_000, 4096) == 4096
    eager = qwen2(2, "eager")
    assert attention.use_mask_free_attention(eager) == "eager"  # the reference stays as it is
