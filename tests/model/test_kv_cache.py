"""The preallocated KV cache (`longva_cli.model.kv_cache`): the same answers as transformers'
`DynamicCache`, written in place (no copy per token), and the prefix reuse built on it."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from longva_cli.engine import PrefixCache
from longva_cli.engine.runner import RunnerPool
from longva_cli.engine.sequence import Sequence
from longva_cli.model import attention
from longva_cli.model.attention import use_mask_free_attention
from longva_cli.model.compat import cache_kwargs
from longva_cli.model.kernel_choice import KernelChoice
from longva_cli.engine.memory import kv_bytes_per_token
from longva_cli.model.kv_cache import FLOAT8, Float8KVLayer, KVCache, use_kv_cache

# FlexAttention runs eagerly on the CPU (compiled, it takes tens of seconds): it says so once
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def qwen2(kv_heads: int = 2) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=kv_heads, max_position_embeddings=4096, rope_theta=1e6,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM._from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    use_mask_free_attention(model)
    return model


def greedy(model, cache, prompt: torch.Tensor, chunk: int, new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Prefill `prompt` [seq] in chunks into `cache`, then decode greedily: (ids, last logits)."""
    with torch.no_grad():
        for start in range(0, len(prompt), chunk):
            logits = model(input_ids=prompt[None, start : start + chunk], **cache_kwargs(cache)).logits
        ids = []
        for _ in range(new_tokens):
            ids.append(int(logits[0, -1].argmax()))
            logits = model(input_ids=torch.tensor([[ids[-1]]]), **cache_kwargs(cache)).logits
    return ids, logits[0, -1]


# multi-head, GQA 4:1, multi-query; reserve 0: grows as it goes; 40: grows once in decoding; 1000: never
@pytest.mark.parametrize("kv_heads,chunk,reserve", [(8, 16, 0), (2, 7, 40), (1, 64, 1000)])
def test_the_preallocated_cache_decodes_the_tokens_of_dynamic_cache(kv_heads, chunk, reserve):
    model = qwen2(kv_heads)
    prompt = torch.randint(0, 97, (50,), generator=torch.Generator().manual_seed(1))
    expected_ids, expected_logits = greedy(model, DynamicCache(config=model.config), prompt, chunk, 12)
    cache = KVCache.for_model(model.config)
    cache.reserve(reserve)
    ids, logits = greedy(model, cache, prompt, chunk, 12)
    assert ids == expected_ids
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == 50 + 12


@pytest.mark.parametrize("kernels", ["math/gemm", "cpu-flash/cpu-flash", "flex/math"])
def test_named_kernels_run_and_decode_the_tokens_of_the_default_path(kernels, monkeypatch):
    model = qwen2(2)
    prompt = torch.randint(0, 97, (80,), generator=torch.Generator().manual_seed(2))
    expected_ids, expected_logits = greedy(model, DynamicCache(config=model.config), prompt, 32, 10)
    ran = []
    for name in ("split_prefill", "decode_attention", "gemm_decode"):
        real = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda *a, _real=real, _name=name, **k: (ran.append((_name, k.get("backend"))), _real(*a, **k))[1])
    use_mask_free_attention(model, KernelChoice.parse(kernels))
    ids, logits = greedy(model, KVCache.for_model(model.config), prompt, 32, 10)
    assert ids == expected_ids
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
    prefill, decode = kernels.split("/")
    layers = model.config.num_hidden_layers
    # chunks 2 and 3 follow a cached past; the first attends to itself alone (transformers' is_causal)
    assert ran.count(("split_prefill", prefill)) == 2 * layers
    decoded = ("gemm_decode", None) if decode == "gemm" else ("decode_attention", decode)
    assert ran.count(decoded) == 10 * layers and len(ran) == 12 * layers


def test_decoding_writes_in_place_into_the_reserved_buffers():
    model = qwen2()
    cache = KVCache.for_model(model.config)
    cache.reserve(100)
    prompt = torch.randint(0, 97, (30,), generator=torch.Generator().manual_seed(3))
    greedy(model, cache, prompt, 8, 1)
    buffers = [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in cache.layers]
    greedy(model, cache, torch.tensor([5, 6, 7]), 1, 20)
    assert [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in cache.layers] == buffers
    assert cache.capacity == 100 and cache.get_seq_length() == 30 + 1 + 3 + 20  # greedy feeds back each token it picks


def test_without_room_the_cache_grows_by_half_so_each_position_is_copied_rarely():
    model = qwen2()
    cache = KVCache.for_model(model.config)
    resizes = []
    layer = cache.layers[0]
    real_resize = type(layer)._resize

    def count(self, capacity):
        if self is layer:
            resizes.append(capacity)
        real_resize(self, capacity)

    type(layer)._resize = count
    try:
        greedy(model, cache, torch.randint(0, 97, (10,)), 10, 60)
    finally:
        type(layer)._resize = real_resize
    assert resizes == [10, 15, 22, 33, 49, 73]  # geometric: 6 copies for 70 positions, not 60


def test_crop_forgets_positions_without_freeing_and_storage_dtype_is_the_caches_own():
    model = qwen2()
    cache = KVCache.for_model(model.config, storage_dtype=torch.float64)
    greedy(model, cache, torch.arange(20), 20, 0)
    assert cache.layers[0].keys.dtype == torch.float64  # stored wide, read in the model's dtype
    keys, _ = cache.layers[0].read(20)
    assert keys.dtype == torch.float32 and keys.shape == (1, 2, 20, 8)
    capacity = cache.capacity
    cache.crop(-5)
    assert cache.get_seq_length() == 15 and cache.capacity == capacity
    cache.crop(4)  # a positive count keeps that many, as DynamicCache's crop does
    assert cache.get_seq_length() == 4


def test_a_fork_copies_the_prefix_and_leaves_the_original_alone():
    model = qwen2()
    original = KVCache.for_model(model.config)
    prompt = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(4))
    greedy(model, original, prompt, 40, 0)
    twin = original.fork(25, capacity=60)
    assert twin.get_seq_length() == 25 and twin.capacity == 60
    torch.testing.assert_close(twin.layers[1].read(25), original.layers[1].read(25), rtol=0, atol=0)
    twin_ids, _ = greedy(model, twin, prompt[25:], 15, 5)
    fresh_ids, _ = greedy(model, KVCache.for_model(model.config), prompt, 40, 5)
    assert twin_ids == fresh_ids
    assert original.get_seq_length() == 40


def test_prefix_cache_reserves_the_sequence_and_what_the_caller_will_add():
    model = qwen2()
    embeds = torch.randn(70, 64)
    sequence = Sequence(keys=torch.arange(70).numpy(), embed=lambda start, stop: embeds[start:stop])
    runner = PrefixCache(model, chunk=32)
    runner.reserve(70 + 16)
    list(runner.chunks(sequence, 70, 69))
    buffers = runner.cache.layers[0].keys.data_ptr()
    for token in range(16):
        runner.step(token)
    assert runner.cache.layers[0].keys.data_ptr() == buffers and runner.cache.capacity == 86


@pytest.mark.parametrize("kv_cache", ["auto", "fp8"])
def test_a_pool_fork_keeps_both_conversations_answering_as_fresh_caches(kv_cache):
    model = qwen2()
    use_kv_cache(model, kv_cache)  # what `--kv-cache` does to a loaded model: every runner and the pool follow it
    embeds = torch.randn(120, 64)
    video = Sequence(keys=torch.arange(100).numpy(), embed=lambda start, stop: embeds[start:stop])
    other = Sequence(keys=torch.cat([torch.arange(80), torch.arange(500, 520)]).numpy(), embed=lambda start, stop: embeds[start:stop])
    pool = RunnerPool(model, budget_bytes=1 << 30, chunk=32)
    storage = {"auto": torch.float32, "fp8": FLOAT8}[kv_cache]
    assert pool.per_token == kv_bytes_per_token(model.config, storage)

    @torch.inference_mode()
    def answer(runner, sequence):
        hidden = list(runner.chunks(sequence, len(sequence), len(sequence) - 1))[-1].hidden[-1:]
        return [int(runner.step(token).argmax()) for token in (model.lm_head(hidden)[0].argmax(), 3, 4)]

    first = pool.acquire(video)
    first_answer = answer(first, video)
    second = pool.acquire(other)  # shares 80 of the first's 103 positions: a fork
    assert second is not first and len(first) == 103
    assert first.cache.layers[0].keys.dtype == second.cache.layers[0].keys.dtype == storage
    assert answer(second, other) == answer(PrefixCache(model, 32), other)
    first.truncate(100)
    assert answer(first, video) == first_answer


# ---- fp8 storage (`--kv-cache fp8`) -------------------------------------------------------------
# float8 e4m3 keeps 3 mantissa bits: these tiny models' logits (magnitude ~0.5) move by at most
# 0.0033 with it (measured on the three cases below); the bound leaves three times that.
FP8_LOGIT_BOUND = 0.01


@pytest.mark.parametrize("kv_heads,chunk,reserve", [(8, 16, 0), (2, 7, 40), (1, 64, 1000)])
def test_an_fp8_cache_decodes_the_greedy_tokens_of_the_float32_cache(kv_heads, chunk, reserve):
    model = qwen2(kv_heads)
    prompt = torch.randint(0, 97, (50,), generator=torch.Generator().manual_seed(1))
    expected_ids, expected_logits = greedy(model, DynamicCache(config=model.config), prompt, chunk, 12)
    cache = KVCache.for_model(model.config, storage_dtype=FLOAT8)
    cache.reserve(reserve)
    ids, logits = greedy(model, cache, prompt, chunk, 12)
    assert ids == expected_ids
    gap = float((logits - expected_logits).abs().max())
    assert 0 < gap < FP8_LOGIT_BOUND  # not zero: the keys and values really went through float8
    assert isinstance(cache.layers[0], Float8KVLayer) and cache.layers[0].keys.dtype == FLOAT8


def test_fp8_storage_takes_what_the_memory_plan_counts_about_half_of_bf16():
    # head size 128, as LongVA's: the float32 scale per vector adds 4 bytes to 128
    config = Qwen2Config(vocab_size=97, hidden_size=256, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa").eval()
    held = {}
    for dtype in (torch.bfloat16, FLOAT8):
        cache = KVCache.for_model(config, storage_dtype=dtype)
        cache.reserve(64)
        greedy(model, cache, torch.arange(40), 40, 0)
        assert cache.held_bytes() == 64 * kv_bytes_per_token(config, dtype)
        held[dtype] = cache.held_bytes()
    assert held[FLOAT8] / held[torch.bfloat16] == (128 + 4) / 256
    layer = cache.layers[0]
    assert layer.keys.shape == (1, 1, 64, 128) and layer.key_scales.shape == (1, 1, 64, 1) and layer.key_scales.dtype == torch.float32


def test_fp8_crops_and_forks_continue_as_a_cold_fp8_run():
    model = qwen2()
    prompt = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(4))
    cold_ids, cold_logits = greedy(model, KVCache.for_model(model.config, FLOAT8), prompt, 40, 6)
    original = KVCache.for_model(model.config, FLOAT8)
    greedy(model, original, prompt, 40, 0)
    twin = original.fork(25, capacity=60)
    for name in ("keys", "values", "key_scales", "value_scales"):  # the stored form is copied, not requantized
        assert torch.equal(getattr(twin.layers[1], name)[:, :, :25].float(), getattr(original.layers[1], name)[:, :, :25].float())
    original.crop(-15)
    for cache in (twin, original):
        ids, logits = greedy(model, cache, prompt[25:], 15, 6)
        assert ids == cold_ids
        torch.testing.assert_close(logits, cold_logits, rtol=0, atol=1e-5)  # the same stored prefix: float rounding only


def test_a_bad_kv_cache_name_is_one_sentence_before_anything_loads(tiny_checkpoint, video_file, monkeypatch, capsys):
    from longva_cli.cli import main

    monkeypatch.setattr(sys, "argv", ["longva", "ask", str(video_file), "Q?", "--model", str(tiny_checkpoint), "--kv-cache", "fp4"])
    with pytest.raises(SystemExit) as exited:
        main()
    err = capsys.readouterr().err
    assert exited.value.code != 0 and "Traceback" not in err and "Loaded" not in err
    assert " ".join(err.split()).endswith("--kv-cache 'fp4' is not known; use auto, bf16, fp8.")
