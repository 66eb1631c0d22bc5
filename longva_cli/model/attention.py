"""Mask-free SDPA for chunked prefill and decoding: no dense mask, and the measured fastest kernel.

Chunked prefill runs `q` new positions against `k = past + q` keys. transformers' SDPA path
aligns `is_causal` to the top-left corner, so for `q < k` it builds a dense `[q, k]` boolean
mask for every chunk (several GB at 432K tokens), and a mask pushes SDPA off its fastest CUDA
kernels. The right answer is causal attention aligned to the bottom-right corner (query `i`
sees keys `0 .. past + i`), which needs no mask at all.

`MASK_FREE_SDPA` is registered with transformers' `AttentionInterface` (and a mask function
with `AttentionMaskInterface`) so that:

- the plain causal case (no padding, no sliding window, keys = past + present) builds no mask
  at all; a chunk after a cached prefix then runs the prefill kernel, one new token the decode
  kernel, each named with `--attn` or measured on the device (`model/kernel_choice.py`):
  "lower-right" is one `causal_lower_right` call (on CUDA in one kernel: flash with native
  GQA in bf16/fp16, memory-efficient otherwise; on devices whose kernels need a mask, in
  blocks of query rows whose mask stays under `MASK_ELEMENTS`), the others split the chunk at
  the past and merge by log-sum-exp (`model/kernels.py`);
- everything else (padding masks, sliding windows, whole sequences, non-causal modules) goes
  through transformers' own SDPA function with its own mask, unchanged.

Flash-attention 2 (the `flash-attn` package) stays the first choice where it is installed.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function, sdpa_mask

from longva_cli.model.kernel_choice import BEFORE, KernelChoice, choose, kernels_of, shape_class, use_kernels
from longva_cli.model.kernels import decode_attention, gemm_decode, split_prefill

MASK_FREE_SDPA = "longva_sdpa"
# Largest dense mask (elements) one attention call may build where the kernel needs one: the
# query rows of a chunk are split to stay under it. transformers' SDPA and eager builds one
# [chunk, seq] mask per chunk (on CPU ~6 bytes an element with the float scores beside it,
# measured), so with them the chunk itself has to shrink with the sequence (`prefill_chunk`).
MASK_ELEMENTS = {"cpu": 1 << 26, "cuda": 1 << 31}
# Implementations that materialise no [chunk, seq] mask in prefill, so the chunk never shrinks.
WITHOUT_DENSE_MASK = ("flash_attention_2", "flash_attention_3", MASK_FREE_SDPA)


def prefill_chunk(language_model, total: int, requested: int) -> int:
    """Prefill chunk (tokens) for a `total`-token sequence through `language_model`.

    Mask-free implementations keep the requested chunk at any length; transformers' SDPA and
    eager build a dense [chunk, total] mask per chunk, so the chunk shrinks to keep that mask
    under `MASK_ELEMENTS` (never below 128 tokens, never above `requested`).
    """
    if language_model.config._attn_implementation in WITHOUT_DENSE_MASK:
        return requested
    budget = MASK_ELEMENTS["cuda" if language_model.device.type == "cuda" else "cpu"]
    return min(requested, max(128, budget // max(total, 1)))


def use_mask_free_attention(language_model, kernels: KernelChoice = KernelChoice()) -> str:
    """Switch a loaded model's SDPA attention to `MASK_FREE_SDPA` running `kernels`; returns the
    implementation in use. Flash-attention and eager (the reference) are left as they are."""
    if language_model.config._attn_implementation == "sdpa":
        language_model.set_attn_implementation(MASK_FREE_SDPA)
    if language_model.config._attn_implementation == MASK_FREE_SDPA:
        use_kernels(language_model, kernels)
    return language_model.config._attn_implementation


def mask_free_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query [b, heads, q, d], key/value [b, kv heads, k, d] -> [b, q, heads, d]."""
    q_length, kv_length = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is not None or not causal or q_length >= kv_length or kwargs.get("position_bias") is not None:
        # transformers' own path is exact and mask-free here (is_causal for q == k)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    choice = kernels_of(module) if not dropout else KernelChoice(BEFORE["prefill"], BEFORE["decode"])  # the kernels that take dropout
    phase = "decode" if q_length == 1 else "prefill"

    def run(kernel: str) -> torch.Tensor:  # [b, heads, q, d]
        if kernel == "sdpa":
            return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)[0].transpose(1, 2)
        if kernel == "lower-right":
            return lower_right_causal_attention(query, key, value, groups=groups, scale=scaling, dropout=dropout)
        if kernel == "gemm":
            return gemm_decode(query, key, value, groups=groups, scale=scaling)
        if phase == "decode":
            return decode_attention(query, key, value, groups=groups, scale=scaling, backend=kernel)
        return split_prefill(query, key, value, groups=groups, scale=scaling, backend=kernel)

    named = choice.decode if phase == "decode" else choice.prefill
    shape = shape_class(phase, query.dtype, query.shape[1], key.shape[1], query.shape[-1], q_length, kv_length)
    out = run(choose(phase, named, query.device, shape, run))
    return out.transpose(1, 2).contiguous(), None


def lower_right_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    groups: int = 1,
    scale: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Causal attention of the last `q` positions over all `k` keys (query i sees keys 0 .. k - q + i).

    query [b, kv_heads * groups, q, d], key/value [b, kv_heads, k, d] -> [b, kv_heads * groups, q, d].
    """
    from torch.nn.attention.bias import causal_lower_right

    q_length, kv_length = query.shape[2], key.shape[2]
    gqa = groups > 1
    if _mask_free_kernel(query, key, value, gqa):  # flash: grouped heads without copies
        bias = causal_lower_right(q_length, kv_length)
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout, scale=scale, enable_gqa=gqa)
    if gqa and query.device.type == "cuda":
        # the memory-efficient kernel (fp32, or head sizes flash does not take) needs equal heads
        key, value, gqa = repeat_kv(key, groups), repeat_kv(value, groups), False
        if _mask_free_kernel(query, key, value, False):
            bias = causal_lower_right(q_length, kv_length)
            return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout, scale=scale)
    return _blockwise_lower_right(query, key, value, gqa=gqa, scale=scale, dropout=dropout)


def _mask_free_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, gqa: bool) -> bool:
    """Whether PyTorch's flash or memory-efficient CUDA kernel takes these tensors (no mask needed)."""
    if query.device.type != "cuda":
        return False
    from torch.backends.cuda import SDPAParams, can_use_efficient_attention, can_use_flash_attention

    params = SDPAParams(query, key, value, None, 0.0, False, gqa)
    return can_use_flash_attention(params, False) or can_use_efficient_attention(params, False)


def _blockwise_lower_right(query, key, value, *, gqa: bool, scale: float | None, dropout: float) -> torch.Tensor:
    """Lower-right causal attention with explicit masks, in blocks of query rows of bounded mask size.

    Rows r0..r1 see keys 0 .. past + r1 - 1 at most, so each block slices the keys to that
    length and its mask is itself lower-right causal: [r1 - r0, past + r1].
    """
    q_length, kv_length = query.shape[2], key.shape[2]
    past = kv_length - q_length
    budget = MASK_ELEMENTS["cuda" if query.device.type == "cuda" else "cpu"]
    rows = max(1, min(q_length, budget // kv_length))
    outputs = []
    for start in range(0, q_length, rows):
        stop = min(start + rows, q_length)
        visible = past + stop
        mask = torch.ones(stop - start, visible, dtype=torch.bool, device=query.device).tril(visible - (stop - start))
        outputs.append(
            torch.nn.functional.scaled_dot_product_attention(
                query[:, :, start:stop], key[:, :, :visible], value[:, :, :visible],
                attn_mask=mask, dropout_p=dropout, scale=scale, enable_gqa=gqa,
            )
        )
    return torch.cat(outputs, dim=2)


def mask_free_sdpa_mask(*args, **kwargs):
    """Mask function for `MASK_FREE_SDPA`: None (lower-right causal, built by no one) in the plain
    causal case, transformers' SDPA mask otherwise."""
    padding = kwargs.get("attention_mask")
    plain = (
        kwargs.get("mask_function", causal_mask_function) is causal_mask_function
        and kwargs.get("local_size") is None
        and kwargs.get("kv_offset", 0) == 0
        and _keys_are_past_and_present(kwargs)
        and (padding is None or bool(padding.all()))
    )
    if plain:
        return None
    return sdpa_mask(*args, **kwargs)


def _keys_are_past_and_present(kwargs: dict) -> bool:
    """True when attention sees exactly the positions before the queries plus the queries
    (a dynamic cache; a static cache hands over its whole, partly empty buffer)."""
    q_length, kv_length, offset = kwargs.get("q_length"), kwargs.get("kv_length"), kwargs.get("q_offset", 0)
    return q_length is not None and kv_length is not None and int(offset) + q_length == kv_length


AttentionInterface.register(MASK_FREE_SDPA, mask_free_sdpa_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(MASK_FREE_SDPA, mask_free_sdpa_mask)
