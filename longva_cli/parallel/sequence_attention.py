"""Sequence parallelism: one long sequence split across the ranks of a group (training, and
teacher-forced scoring in `engine/sequence_parallel.py`).

Two maintained backends plug into transformers through `AttentionInterface` (`enable`), so a
HF Qwen2 model runs unchanged and only its attention call becomes distributed:

- `ulysses` (default; CPU/gloo and GPU): DeepSpeed's `DistributedAttention`. Each rank holds a
  contiguous slice of the sequence; an all-to-all turns (slice, all heads) into (full sequence,
  heads / degree), local attention runs on whole sequences, a second all-to-all turns it back.
  So the degree must divide the sequence length and the number of KV heads (Qwen2-7B has 4 KV
  heads: degree 1, 2 or 4; for 8 GPUs use `ring`, or Ulysses 4 with 2-way data parallelism).
- `ring` (GPU only): zigzag ring flash attention from the `ring-flash-attn` package. The
  sequence is cut into 2 x degree chunks and rank r holds chunks r and 2*degree-1-r, which
  balances causal work; any KV-head count works, the length must divide by 2 x degree.

Either way, each rank's RoPE position ids are the real positions of its tokens in the full
sequence, so the model sees exactly what one device would see. The groups come from
`ranks.init_distributed`. torch is imported inside the functions, so importing this module
costs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from longva_cli.errors import LongVAError

if TYPE_CHECKING:
    import torch

    from longva_cli.parallel.ranks import ParallelState

ATTENTION_NAME = "longva_sequence_parallel"


def check_layout(seq_len: int, degree: int, backend: str, num_kv_heads: int) -> None:
    """Raise a LongVAError when the sequence or the heads cannot be split `degree` ways."""
    if degree < 1:
        raise LongVAError("parallel.sequence_parallel must be at least 1.")
    if degree == 1:
        return
    parts = 2 * degree if backend == "ring" else degree
    if seq_len % parts:
        below, above = seq_len - seq_len % parts, seq_len - seq_len % parts + parts
        what = f"2 x {degree} zigzag chunks" if backend == "ring" else f"{degree} ranks"
        raise LongVAError(
            f"data.seq_len {seq_len} cannot be split evenly into {what}; use data.seq_len={below} "
            f"or {above}, or a sequence_parallel degree that divides {seq_len}."
        )
    if backend == "ulysses" and num_kv_heads % degree:
        divisors = [d for d in range(1, num_kv_heads + 1) if num_kv_heads % d == 0]
        raise LongVAError(
            f"Ulysses shards attention heads, and this model's {num_kv_heads} KV heads do not divide "
            f"by {degree}; use parallel.sequence_parallel in {divisors} (with data parallelism for the "
            f"other GPUs) or parallel.backend=ring on GPUs."
        )


def shard_indices(seq_len: int, degree: int, rank: int, backend: str = "ulysses") -> torch.Tensor:
    """Global token positions this rank holds: one contiguous slice, or two zigzag chunks."""
    import torch

    if backend == "ring" and degree > 1:
        chunk = seq_len // (2 * degree)
        first = torch.arange(rank * chunk, (rank + 1) * chunk)
        second_start = (2 * degree - 1 - rank) * chunk
        return torch.cat([first, torch.arange(second_start, second_start + chunk)])
    part = seq_len // degree
    return torch.arange(rank * part, (rank + 1) * part)


def shard(tokens: torch.Tensor, state: ParallelState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs, labels and position ids of this rank, from rows of L+1 tokens ([batch, L+1]).

    Labels are shifted before splitting, so the last token of a slice is still trained on
    the first token of the next slice.
    """
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    index = shard_indices(inputs.shape[1], state.sp_degree, state.sp_rank, state.backend)
    positions = index.unsqueeze(0).expand(inputs.shape[0], -1)
    return inputs[:, index], labels[:, index], positions


_ACTIVE: dict[str, Any] = {}


def _local_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention over whole sequences, layout [batch, seq, heads, dim] in and out.

    Also the `local_attention` DeepSpeed's DistributedAttention calls between its all-to-alls.
    """
    import torch

    if query.is_cuda and _flash_attn() is not None:
        return _flash_attn()(query, key, value, softmax_scale=scale, causal=True)
    out = torch.nn.functional.scaled_dot_product_attention(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        is_causal=True,
        scale=scale,
        enable_gqa=key.shape[2] != query.shape[2],
    )
    return out.transpose(1, 2)


def _flash_attn():
    if "flash" not in _ACTIVE:
        try:
            from flash_attn import flash_attn_func
        except ImportError:
            flash_attn_func = None
        _ACTIVE["flash"] = flash_attn_func
    return _ACTIVE["flash"]


def _attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention hook: query/key/value arrive as [batch, heads, local seq, dim]."""
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # -> [batch, local seq, heads, dim]
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    state: ParallelState | None = _ACTIVE.get("state")
    if state is None or state.sp_degree == 1:
        out = _local_attention(q, k, v, scale)
    elif state.backend == "ring":
        out = _ACTIVE["ring"](q, k, v, softmax_scale=scale, causal=True, group=state.sp_group)
    else:
        out = _ACTIVE["ulysses"](q, k, v, 0, None, scale)  # batch_dim_idx=0, no fused rotary
    return out, None


def enable(model, state: ParallelState) -> None:
    """Route `model`'s attention through the sequence-parallel backend of `state`.

    With no attention mask registered for this implementation, transformers builds none and
    the hook attends causally over whole sequences (rows are packed without document masks).
    """
    import torch
    from transformers import AttentionInterface

    _ACTIVE["state"] = state
    if state.sp_degree > 1 and state.backend == "ring":
        if not torch.cuda.is_available():
            raise LongVAError("parallel.backend=ring needs CUDA GPUs; use parallel.backend=ulysses on CPU.")
        try:
            from ring_flash_attn import zigzag_ring_flash_attn_func
        except ImportError:
            raise LongVAError(
                "parallel.backend=ring needs the ring-flash-attn package; `pip install ring-flash-attn flash-attn`."
            ) from None
        _ACTIVE["ring"] = zigzag_ring_flash_attn_func
    elif state.sp_degree > 1:
        from deepspeed.sequence.layer import DistributedAttention

        # [batch, seq/p, heads, dim] -> scatter heads (dim 2), gather sequence (dim 1)
        _ACTIVE["ulysses"] = DistributedAttention(_local_attention, state.sp_group, scatter_idx=2, gather_idx=1)
    AttentionInterface.register(ATTENTION_NAME, _attention_forward)
    model.config._attn_implementation = ATTENTION_NAME
    for sub in model.modules():  # sub-configs, if any, share the choice
        config = getattr(sub, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = ATTENTION_NAME


def disable() -> None:
    """Forget the backend `enable` set up, once its process group is gone: a model still routed
    here then attends locally instead of through a destroyed group."""
    _ACTIVE.clear()
