"""Attention kernels for a chunk after a cached past (prefill) and for one new token (decode).

Shapes: b batch, kv key/value heads, g query heads per KV head, h = kv * g query heads, q new
positions, p cached positions before them, n = p + q keys, d head dim. Queries [b, h, q, d];
keys and values [b, kv, n, d]; outputs [b, h, q, d]; log-sum-exps [b, h, q], float32 at least.

Prefill, `split_prefill` (q > 1 new positions after p > 0 cached ones): the chunk attends to the
past without a mask and to itself causally, and the two partial results merge exactly by their
log-sum-exps (`merge_partials`). The past part has no causal constraint, so the g query heads of
a KV head fold into g * q rows of one head (`fold_groups`): grouped-query attention without
repeating keys. The chunk-to-itself part is square, where top-left and bottom-right causal
alignment agree, so a plain `is_causal` call does it (its keys, q of them, are repeated: cheap).
Neither needs a bias, so the fastest fused kernels (cuDNN's) take them; the one-call
alternative, a `causal_lower_right` bias (`model/attention.py`), always lands on PyTorch's
FlashAttention-2 port.

Decode, `decode_attention` (one new query over n keys): GQA folded the same way, one backend
call; or `gemm_decode`, two batched cuBLAS products and a float32 softmax in between.

Backends (`BACKENDS`: name -> device types), each giving the output and its log-sum-exp:
  cudnn, flash, efficient  PyTorch's fused CUDA kernels, called directly (no process-wide
                           backend flag is flipped)
  flex                     FlexAttention (compiled on CUDA; eager, for tests, on the CPU)
  cpu-flash                PyTorch's CPU flash kernel
  math                     explicit products in float32 (float64 for float64 inputs): the reference
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

# cuDNN builds an execution plan per exact shape and reuses it for equal ones; a KV length that
# grows every chunk and every token would build one per call. With this set (read once, at the
# first cuDNN attention call), sequence-major tensors, which the KV cache stores, share one
# plan per power-of-two length. Set it to 0 before starting Python to keep one plan per length.
os.environ.setdefault("TORCH_CUDNN_SDPA_AVOID_RECOMPILE", "1")

Partial = tuple[torch.Tensor, torch.Tensor]  # (output [b, heads, rows, d], log-sum-exp [b, heads, rows])

# Largest [rows, keys] score block the math backend materialises at once.
MATH_SCORE_ELEMENTS = 1 << 26


# ---- grouped-query layout ----------------------------------------------------------------------------------


def fold_groups(query: torch.Tensor, groups: int) -> torch.Tensor:
    """[b, kv * g, q, d] -> [b, kv, g * q, d]: the g query heads of each KV head as rows of one head
    (row gi * q + qi is head kv_i * g + gi, position qi), sequence-major in memory."""
    b, heads, q, d = query.shape
    kv = heads // groups
    folded = query.reshape(b, kv, groups, q, d).permute(0, 2, 3, 1, 4).reshape(b, groups * q, kv, d)
    return folded.transpose(1, 2)


def unfold_groups(folded: torch.Tensor, groups: int) -> torch.Tensor:
    """The inverse of `fold_groups` for outputs [b, kv, g * q, d] or log-sum-exps [b, kv, g * q]."""
    b, kv, rows = folded.shape[:3]
    return folded.reshape(b, kv * groups, rows // groups, *folded.shape[3:])


def repeat_heads(states: torch.Tensor, groups: int) -> torch.Tensor:
    """Keys or values [b, kv, n, d] -> [b, kv * g, n, d] (head kv_i * g + gi reads KV head kv_i), sequence-major."""
    return states.transpose(1, 2).repeat_interleave(groups, dim=2).transpose(1, 2)


def sequence_major(states: torch.Tensor) -> torch.Tensor:
    """`states` [b, heads, s, d] laid out as [b, s, heads, d] in memory (copied only if it is not)."""
    return states if states.transpose(1, 2).is_contiguous() else states.transpose(1, 2).contiguous().transpose(1, 2)


# ---- backends: output and log-sum-exp ------------------------------------------------------------------


def _cudnn(query, key, value, causal: bool, scale: float | None) -> Partial:
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(query, key, value, None, True, 0.0, causal, False, scale=scale)[:2]
    return out, lse


def _flash(query, key, value, causal: bool, scale: float | None) -> Partial:
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, causal, False, scale=scale)[:2]
    return out, lse


def _efficient(query, key, value, causal: bool, scale: float | None) -> Partial:
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, None, True, 0.0, causal, scale=scale)[:2]
    return out, lse  # lse rows are padded to a multiple of 32; `attend` cuts them


def _cpu_flash(query, key, value, causal: bool, scale: float | None) -> Partial:
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, causal, scale=scale)


def _math(query, key, value, causal: bool, scale: float | None) -> Partial:
    """Reference: explicit products in float32 (float64 for float64), in blocks of query rows."""
    work = torch.promote_types(query.dtype, torch.float32)
    rows, keys = query.shape[2], key.shape[2]
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    step = max(1, min(rows, MATH_SCORE_ELEMENTS // max(keys * query.shape[1], 1)))
    outs, lses = [], []
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        scores = query[:, :, start:stop].to(work) @ key.to(work).transpose(-1, -2) * scale  # [b, heads, rows, keys]
        if causal:  # top-left aligned, as is_causal: row r sees keys 0 .. r
            hidden = torch.ones(stop - start, keys, dtype=torch.bool, device=query.device).triu(start + 1)
            scores = scores.masked_fill(hidden, float("-inf"))
        lses.append(torch.logsumexp(scores, dim=-1))
        outs.append(torch.softmax(scores, dim=-1) @ value.to(work))
    return torch.cat(outs, dim=2).to(query.dtype), torch.cat(lses, dim=2)


def _flex(query, key, value, causal: bool, scale: float | None) -> Partial:
    from torch.nn.attention import flex_attention as flex

    run = _compiled_flex() if query.is_cuda else flex.flex_attention
    block_mask = _causal_block_mask(query.shape[2], str(query.device)) if causal else None
    if hasattr(flex, "AuxRequest"):  # torch >= 2.9
        out, aux = run(query, key, value, block_mask=block_mask, scale=scale, return_aux=flex.AuxRequest(lse=True))
        return out, aux.lse
    return run(query, key, value, block_mask=block_mask, scale=scale, return_lse=True)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


@functools.lru_cache(maxsize=8)
def _causal_block_mask(length: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(lambda b, h, q, k: q >= k, B=None, H=None, Q_LEN=length, KV_LEN=length, device=device)


# name -> (function, device types it runs on)
BACKENDS: dict[str, tuple[Callable[..., Partial], tuple[str, ...]]] = {
    "cudnn": (_cudnn, ("cuda",)),
    "flash": (_flash, ("cuda",)),
    "efficient": (_efficient, ("cuda",)),
    "flex": (_flex, ("cuda", "cpu")),
    "cpu-flash": (_cpu_flash, ("cpu",)),
    "math": (_math, ("cuda", "cpu")),
}


def attend(backend: str, query, key, value, *, causal: bool, scale: float | None) -> Partial:
    """Attention of query [b, heads, rows, d] over key/value [b, heads, keys, d] (equal head
    counts; `causal` aligned top-left) by `backend`: output [b, heads, rows, d] and log-sum-exp
    [b, heads, rows] in float32 (float64 for float64 inputs)."""
    function, _ = BACKENDS[backend]
    out, lse = function(query, key, value, causal, scale)
    b, heads, rows = query.shape[:3]
    lse = lse.reshape(b, heads, -1)[..., :rows]
    return out, lse.to(torch.promote_types(lse.dtype, torch.float32))


def merge_partials(first: Partial, second: Partial) -> Partial:
    """Attention over the union of two disjoint key sets, from the attention over each: outputs
    weighted by their share of the total exponential mass, exp(lse_i - lse)."""
    (out_a, lse_a), (out_b, lse_b) = first, second
    lse = torch.logaddexp(lse_a, lse_b)
    merged = out_a.to(lse.dtype) * (lse_a - lse).exp().unsqueeze(-1) + out_b.to(lse.dtype) * (lse_b - lse).exp().unsqueeze(-1)
    return merged.to(out_a.dtype), lse


# ---- prefill and decode --------------------------------------------------------------------------------


def split_prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, groups: int, scale: float | None, backend: str) -> torch.Tensor:
    """Causal attention of the last q positions over all n keys (query i sees keys 0 .. p + i),
    as past part + present part merged by log-sum-exp (see the module doc).

    query [b, kv * g, q, d], key/value [b, kv, n, d] with n > q -> [b, kv * g, q, d].
    """
    past = key.shape[2] - query.shape[2]
    past_out, past_lse = attend(backend, fold_groups(query, groups), key[:, :, :past], value[:, :, :past], causal=False, scale=scale)
    own_keys, own_values = repeat_heads(key[:, :, past:], groups), repeat_heads(value[:, :, past:], groups)
    present = attend(backend, sequence_major(query), own_keys, own_values, causal=True, scale=scale)
    out, _ = merge_partials((unfold_groups(past_out, groups), unfold_groups(past_lse, groups)), present)
    return out


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, groups: int, scale: float | None, backend: str) -> torch.Tensor:
    """One new query over all n keys by `backend`, grouped heads folded (no repeated keys).

    query [b, kv * g, 1, d], key/value [b, kv, n, d] -> [b, kv * g, 1, d].
    """
    out, _ = attend(backend, fold_groups(query, groups), key, value, causal=False, scale=scale)
    return unfold_groups(out, groups)


def gemm_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, groups: int, scale: float | None) -> torch.Tensor:
    """One new query over all n keys as two batched matrix products (cuBLAS) and a float32 softmax.

    The g query heads of a KV head are the rows of one product with the n keys ([g, n] scores)
    and of one n-long reduction with the values ([g, d]), batched over the KV heads: no
    repeated keys, and cuBLAS spreads the long key axis over the whole card. With one sequence
    the cache's sequence-major views go to cuBLAS as strided matrices, without a copy.

    query [b, kv * g, 1, d], key/value [b, kv, n, d] -> [b, kv * g, 1, d].
    """
    b, heads, _, d = query.shape
    kv = key.shape[1]
    scale = d**-0.5 if scale is None else scale
    queries = query.reshape(b, kv, groups, d)
    scores = _float_product(queries, key.transpose(-1, -2)) * scale  # [b, kv, g, n]
    weights = (scores - scores.amax(-1, keepdim=True)).exp()  # [b, kv, g, n], at most 1
    total = weights.sum(-1, keepdim=True)  # [b, kv, g, 1]
    out = torch.matmul(weights.to(value.dtype), value).to(total.dtype) / total  # [b, kv, g, d]
    return out.reshape(b, heads, 1, d).to(query.dtype)


def _float_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [..., m, k] @ b [..., k, n] with float32 (or float64) results. Half-precision scores are
    not rounded to their own precision: on CUDA the product writes float32 directly (the keys
    are never upcast, which would copy the cache); elsewhere the operands are upcast."""
    if a.dtype in (torch.float32, torch.float64):
        return torch.matmul(a, b)
    if a.is_cuda and _bmm_has_out_dtype(a.device.index or 0):
        batch = a.shape[:-2]
        product = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), out_dtype=torch.float32)
        return product.reshape(*batch, *product.shape[-2:])
    return torch.matmul(a.float(), b.float())


@functools.cache
def _bmm_has_out_dtype(device_index: int) -> bool:
    """Whether this torch build multiplies half-precision matrices into float32 results directly on CUDA."""
    probe = torch.ones(1, 2, 2, dtype=torch.bfloat16, device=torch.device("cuda", device_index))
    try:
        return torch.bmm(probe, probe, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False
