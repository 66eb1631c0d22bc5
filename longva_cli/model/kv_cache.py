"""A KV cache that never copies what it holds: preallocated per layer, written in place, read as views.

transformers' `DynamicCache` appends each chunk and each decoded token with `torch.cat`, so
every decoded token copies the whole cache: at 432K tokens of a 7B model, about 50 GB of memory
traffic a token on top of the token's own work. The engine knows how far a sequence goes before
it runs it (the prompt, plus the most tokens it may generate), so `KVCache` allocates each
layer's keys and values for that many positions once, writes every chunk and every token in
place, and hands attention views of exactly the positions held, past + present, as
`DynamicCache` does: the mask-free attention of `model/attention.py` still sees keys = past +
present and builds no mask. It plugs into transformers' `Cache` API (`update`, `crop`,
`get_seq_length`, `get_mask_sizes`), so Qwen2's own forward fills and reads it.

Layout: each layer's buffers are [batch, kv_heads, capacity, head_dim] views, and attention
gets views of their first n positions. In memory they are laid out as each device's kernels read
them fastest: on CUDA sequence-major ([batch, capacity, kv_heads, head_dim]: with one sequence the
first n positions are then contiguous, so cuDNN keeps one plan per power-of-two length instead of
building one per length, see `model/kernels.py`); elsewhere head-major (PyTorch's CPU flash
kernel reads a sequence-major cache at about a third of the speed, measured).

Room: `reserve(n)` makes room for n positions exactly (a 432K-token cache is 23 GiB; growing
it by half again would not fit beside it on an 80 GB card), once per prompt or chat turn. A
write past the reserved room (a caller that did not reserve) grows it by half, so such a
caller still copies each position O(1) times on average.

Storage dtype: one cache type for every storage dtype. A layer's storage is defined by two
methods, `write` (positions [start, stop) in place) and `read` ([0, stop) in the dtype attention
computes in); a storage dtype other than the model's (float8 with per-block scales, later)
overrides those two and nothing else. Today the storage dtype is the model's unless given.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

GROWTH = 1.5  # a write past the reserved room grows it by this factor


class KVLayer(CacheLayerMixin):
    """One layer's keys and values: buffers [batch, kv_heads, capacity, head_dim], `length` positions held.

    `keys` / `values` are the whole buffers (as transformers' static layers keep them); what
    attention reads is `read(length)`.
    """

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, storage_dtype: torch.dtype | None = None, **kwargs) -> None:
        super().__init__()
        self.storage_dtype = storage_dtype
        self.length = 0
        self.reserved = 0  # room asked for before the first write told the shape

    # ---- the two methods a storage format defines ----------------------------------------------------

    def write(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store keys/values [batch, kv_heads, n, head_dim] at positions [start, start + n)."""
        stop = start + keys.shape[-2]
        self.keys[:, :, start:stop].copy_(keys)
        self.values[:, :, start:stop].copy_(values)

    def read(self, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions [0, stop) as [batch, kv_heads, stop, head_dim] in the compute dtype."""
        keys, values = self.keys[:, :, :stop], self.values[:, :, :stop]
        if self.storage_dtype != self.dtype:
            keys, values = keys.to(self.dtype), values.to(self.dtype)
        return keys, values

    # ---- transformers' cache layer API ----------------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.storage_dtype = self.storage_dtype or key_states.dtype
        self.shape = key_states.shape[:2] + key_states.shape[3:]  # (batch, kv_heads, head_dim)
        self.keys, self.values = self._allocate(0), self._allocate(0)
        self.is_initialized = True
        if self.reserved:
            self._resize(self.reserved)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Append key/value states [batch, kv_heads, n, head_dim]; all positions held, as views."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, stop = self.length, self.length + key_states.shape[-2]
        if stop > self.capacity:
            self._resize(max(stop, int(self.capacity * GROWTH)))
        self.write(start, key_states, value_states)
        self.length = stop
        return self.read(stop)

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(keys attention sees, offset of the first): the positions held plus the new ones, from 0."""
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1  # grows when asked

    def crop(self, max_length: int) -> None:
        """Keep the first `max_length` positions (a negative count: drop that many from the end), as
        `DynamicLayer.crop` does; nothing is copied or freed."""
        keep = max_length if max_length >= 0 else self.length + max_length
        self.length = max(0, min(self.length, keep))

    def reset(self) -> None:
        self.length = 0

    # ---- room -----------------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.keys.shape[2] if self.is_initialized else 0

    def reserve(self, positions: int) -> None:
        """Make room for `positions` positions in all (exactly; held positions are kept)."""
        if not self.is_initialized:
            self.reserved = max(self.reserved, positions)
        elif positions > self.capacity:
            self._resize(positions)

    def _allocate(self, capacity: int) -> torch.Tensor:
        """An empty buffer [batch, kv_heads, capacity, head_dim] in the device's layout (see the module doc)."""
        batch, heads, head_dim = self.shape
        if self.device.type == "cuda":
            return torch.empty(batch, capacity, heads, head_dim, dtype=self.storage_dtype, device=self.device).transpose(1, 2)
        return torch.empty(batch, heads, capacity, head_dim, dtype=self.storage_dtype, device=self.device)

    def _resize(self, capacity: int) -> None:
        """New buffers of `capacity` positions holding the current ones; keys are copied before the
        values are allocated, so the transient is one layer's keys or values."""
        for name in ("keys", "values"):
            new = self._allocate(capacity)
            new[:, :, : self.length].copy_(getattr(self, name)[:, :, : self.length])
            setattr(self, name, new)

    def copy_prefix(self, length: int, capacity: int) -> "KVLayer":
        """A new layer holding a copy of this one's first `length` positions, with room for `capacity`."""
        twin = type(self)(self.storage_dtype)
        twin.reserved = max(length, capacity)
        if self.is_initialized and length:
            # the stored form is copied as it is (no round trip through the compute dtype)
            twin.device, twin.dtype, twin.shape = self.device, self.dtype, self.shape
            twin.keys, twin.values = twin._allocate(twin.reserved), twin._allocate(twin.reserved)
            twin.keys[:, :, :length].copy_(self.keys[:, :, :length])
            twin.values[:, :, :length].copy_(self.values[:, :, :length])
            twin.is_initialized = True
            twin.length = length
        return twin


class KVCache(Cache):
    """Keys and values of every layer of a decoder (see the module doc)."""

    def __init__(self, layers: list[KVLayer]) -> None:
        super().__init__(layers=layers)

    @classmethod
    def for_model(cls, config, storage_dtype: torch.dtype | None = None) -> "KVCache":
        """An empty cache for a decoder with `config` (its layers allocate on the first write)."""
        return cls([KVLayer(storage_dtype) for _ in range(config.num_hidden_layers)])

    @property
    def capacity(self) -> int:
        return self.layers[0].capacity if self.layers else 0

    def reserve(self, positions: int) -> None:
        """Make room for `positions` positions (held ones are kept); exact, so nothing is wasted."""
        for layer in self.layers:
            layer.reserve(positions)

    def held_bytes(self) -> int:
        """Memory the buffers take (the reserved room, not only the positions held)."""
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers if layer.is_initialized)

    def fork(self, length: int, capacity: int = 0) -> "KVCache":
        """A new cache holding a copy of the first `length` positions, with room for `capacity`."""
        return KVCache([layer.copy_prefix(length, capacity) for layer in self.layers])
