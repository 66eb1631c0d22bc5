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
computes in), and by the buffers it keeps per position (`buffers`); the room, crop and fork logic
is the same for all. `--kv-cache` (`KV_CACHES`) names the storage: `auto` (the model's dtype),
`bf16`, or `fp8`.

fp8 (`Float8KVLayer`): keys and values in float8 e4m3 with one float32 scale per position and
KV head (the largest magnitude of that head's vector maps to e4m3's largest, 448), about half
the bytes of bf16 (head dim 128: 132 bytes a vector instead of 256). Per position, because a
position's stored form then depends on its own keys alone: chunk sizes, prefix reuse, `fork`
and `crop` give exactly the cold run's cache, and a scale never has to be revised when later
tokens come (per-channel scales are fixed by the tokens seen first, and clip the outliers that
come later; `benchmarks/kv_fp8_quality.py` measures both). Integer KV formats quantize keys per
channel because of their outlier channels; an e4m3 element has its own exponent, so an outlier
channel does not cost the rest of its vector precision. `read` dequantizes one layer's keys
and values into the compute dtype inside that layer's attention call, so the transient is one
layer's keys and values, freed before the next layer runs.

A memory plan reads `KV_CACHES` for the storages it may choose and
`engine.memory.kv_bytes_per_token(config, storage_dtype)` for what each costs (scales included).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from longva_cli.errors import LongVAError

GROWTH = 1.5  # a write past the reserved room grows it by this factor
FLOAT8 = torch.float8_e4m3fn
FLOAT8_MAX = torch.finfo(FLOAT8).max  # 448: a scaled vector's largest magnitude lands here
SCALE_DTYPE = torch.float32  # one scale per position and KV head, for keys and for values
# `--kv-cache` names and the storage dtype each means; "auto" is the model's own dtype.
KV_CACHES = {"auto": None, "bf16": torch.bfloat16, "fp8": FLOAT8}


def kv_storage(kv_cache: str) -> torch.dtype | None:
    """The storage dtype `--kv-cache` names (None: the model's dtype), or one sentence on a bad name."""
    if kv_cache not in KV_CACHES:
        raise LongVAError(f"--kv-cache {kv_cache!r} is not known; use {', '.join(KV_CACHES)}.")
    return KV_CACHES[kv_cache]


def check_kv_cache(kv_cache: str, sequence_parallel: int = 1) -> None:
    """One sentence when `--kv-cache` is not a known name, or names a storage for a run that keeps no
    KV cache (each sequence split over ranks); for settings checked before anything is written."""
    kv_storage(kv_cache)
    if sequence_parallel > 1 and kv_cache != "auto":
        raise LongVAError("--kv-cache is for runs that keep a KV cache; --sequence-parallel runs each sequence whole without one, so drop one of them.")


def use_kv_cache(language_model: torch.nn.Module, kv_cache: str) -> None:
    """Make every runner of `language_model` keep its keys and values as `kv_cache` names (kept on the model)."""
    language_model.longva_kv_storage = kv_storage(kv_cache) or language_model.dtype


def kv_storage_of(language_model: torch.nn.Module) -> torch.dtype:
    """The storage dtype runners of `language_model` use: what `use_kv_cache` set, else the model's dtype."""
    return getattr(language_model, "longva_kv_storage", None) or language_model.dtype


def bytes_per_vector(head_dim: int, storage_dtype: torch.dtype) -> int:
    """Bytes one position of one KV head takes, for its keys (or its values), scale included."""
    element = torch.tensor([], dtype=storage_dtype).element_size()
    scale = torch.tensor([], dtype=SCALE_DTYPE).element_size() if storage_dtype == FLOAT8 else 0
    return head_dim * element + scale


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

    # ---- what a storage format defines ----------------------------------------------------------------

    def buffers(self) -> dict[str, tuple[torch.dtype, int]]:
        """The tensors kept per position: name -> (dtype, last dimension)."""
        head_dim = self.shape[2]
        return {"keys": (self.storage_dtype, head_dim), "values": (self.storage_dtype, head_dim)}

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
        for name, (dtype, width) in self.buffers().items():
            setattr(self, name, self._allocate(0, dtype, width))
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

    @property
    def nbytes(self) -> int:
        """Memory the buffers take (the reserved room, not only the positions held)."""
        return sum(getattr(self, name).nbytes for name in self.buffers()) if self.is_initialized else 0

    def _allocate(self, capacity: int, dtype: torch.dtype, width: int) -> torch.Tensor:
        """An empty buffer [batch, kv_heads, capacity, width] in the device's layout (see the module doc)."""
        batch, heads, _ = self.shape
        if self.device.type == "cuda":
            return torch.empty(batch, capacity, heads, width, dtype=dtype, device=self.device).transpose(1, 2)
        return torch.empty(batch, heads, capacity, width, dtype=dtype, device=self.device)

    def _resize(self, capacity: int) -> None:
        """New buffers of `capacity` positions holding the current ones; keys are copied before the
        values are allocated, so the transient is one layer's keys or values."""
        for name, (dtype, width) in self.buffers().items():
            new = self._allocate(capacity, dtype, width)
            new[:, :, : self.length].copy_(getattr(self, name)[:, :, : self.length])
            setattr(self, name, new)

    def copy_prefix(self, length: int, capacity: int) -> "KVLayer":
        """A new layer holding a copy of this one's first `length` positions, with room for `capacity`."""
        twin = type(self)(self.storage_dtype)
        twin.reserved = max(length, capacity)
        if self.is_initialized and length:
            # the stored form is copied as it is (no round trip through the compute dtype)
            twin.device, twin.dtype, twin.shape = self.device, self.dtype, self.shape
            for name, (dtype, width) in self.buffers().items():
                setattr(twin, name, twin._allocate(twin.reserved, dtype, width))
                getattr(twin, name)[:, :, :length].copy_(getattr(self, name)[:, :, :length])
            twin.is_initialized = True
            twin.length = length
        return twin


class Float8KVLayer(KVLayer):
    """Keys and values in float8 e4m3, each position and KV head with its own float32 scale (see the module doc)."""

    def buffers(self) -> dict[str, tuple[torch.dtype, int]]:
        return {**super().buffers(), "key_scales": (SCALE_DTYPE, 1), "value_scales": (SCALE_DTYPE, 1)}

    def scales_of(self, states: torch.Tensor) -> torch.Tensor:
        """Scales [batch, kv_heads, n, 1] of float32 states [batch, kv_heads, n, head_dim]: each vector's
        largest magnitude lands on e4m3's largest."""
        return states.abs().amax(dim=-1, keepdim=True).div_(FLOAT8_MAX).clamp_min_(torch.finfo(SCALE_DTYPE).tiny)

    def write(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        stop = start + keys.shape[-2]
        for states, stored, scales in ((keys, self.keys, self.key_scales), (values, self.values, self.value_scales)):
            wide = states.float()  # this chunk of this layer only (the caller's own tensor when it is float32)
            scale = self.scales_of(wide)
            scales[:, :, start:stop].copy_(scale)
            stored[:, :, start:stop].copy_((wide / scale).clamp_(-FLOAT8_MAX, FLOAT8_MAX))  # rounded to e4m3 by the copy

    def read(self, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self.keys[:, :, :stop].to(self.dtype).mul_(self.key_scales[:, :, :stop])
        values = self.values[:, :, :stop].to(self.dtype).mul_(self.value_scales[:, :, :stop])
        return keys, values


class KVCache(Cache):
    """Keys and values of every layer of a decoder (see the module doc)."""

    def __init__(self, layers: list[KVLayer]) -> None:
        super().__init__(layers=layers)

    @classmethod
    def for_model(cls, config, storage_dtype: torch.dtype | None = None) -> "KVCache":
        """An empty cache for a decoder with `config` (its layers allocate on the first write); keys and
        values stored in `storage_dtype` (None: the model's dtype; float8: `Float8KVLayer`)."""
        layer = Float8KVLayer if storage_dtype == FLOAT8 else KVLayer
        return cls([layer(storage_dtype) for _ in range(config.num_hidden_layers)])

    @property
    def capacity(self) -> int:
        return self.layers[0].capacity if self.layers else 0

    def reserve(self, positions: int) -> None:
        """Make room for `positions` positions (held ones are kept); exact, so nothing is wasted."""
        for layer in self.layers:
            layer.reserve(positions)

    def held_bytes(self) -> int:
        """Memory the buffers take (the reserved room, not only the positions held)."""
        return sum(layer.nbytes for layer in self.layers)

    def fork(self, length: int, capacity: int = 0) -> "KVCache":
        """A new cache holding a copy of the first `length` positions, with room for `capacity`."""
        return KVCache([layer.copy_prefix(length, capacity) for layer in self.layers])
