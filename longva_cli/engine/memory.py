"""How much memory a sequence needs, and how much there is: checked before work starts."""

from __future__ import annotations

from pathlib import Path

import torch

from longva_cli.model.kv_cache import kv_storage_of


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors on `device`."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def total_memory(device: torch.device) -> int:
    """Bytes of memory `device` has in all: what can never be exceeded, however much is freed."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """KV cache bytes per position stored in `dtype`: 2 (keys, values) x layers x KV heads x (head dim x
    element size, plus a scale per vector for float8; `model/kv_cache.py`)."""
    from longva_cli.model.kv_cache import bytes_per_vector

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * bytes_per_vector(head_dim, dtype)


def kv_cache_bytes(config, tokens: int, dtype: torch.dtype) -> int:
    """Size of the KV cache for `tokens` positions."""
    return tokens * kv_bytes_per_token(config, dtype)


def check_fits(language_model, tokens: int) -> str | None:
    """A warning when the KV cache for `tokens` positions will not fit the free memory."""
    device = language_model.get_input_embeddings().weight.device
    need = kv_cache_bytes(language_model.config, tokens, kv_storage_of(language_model))
    free = available_memory(device)
    if need > 0.9 * free:
        return (
            f"{tokens:,} tokens need about {need / 2**30:.1f} GiB of KV cache but only {free / 2**30:.1f} GiB is free; "
            "expect an out-of-memory error (use fewer frames or a bigger device)."
        )
    return None
