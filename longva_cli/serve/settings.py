"""What `longva serve` is started with: the server's settings and, for `--engine vllm`, vLLM's.

Its own module so that the server (`app`), the workers and the command line read the same
settings without importing one another; it imports nothing heavy, so the command's options
show these defaults without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from longva_cli.defaults import MAX_NEW_TOKENS, PREFILL_CHUNK


@dataclass
class RequestLimits:
    """What one request may ask for; set by `longva serve` flags."""

    media_roots: tuple[Path, ...] = ()  # resolved folders file:// URLs may point into
    max_frames: int = 256
    max_tokens: int = MAX_NEW_TOKENS
    max_media: int = 8
    max_prompt_tokens: int | None = None  # None: the model's max_position_embeddings


@dataclass
class ServeSettings:
    """Server-wide settings (the `longva serve` flags other than loading the model)."""

    served_model_name: str = "longva"
    model_aliases: tuple[str, ...] = ()  # other names accepted in `model` (the --model argument)
    limits: RequestLimits = field(default_factory=RequestLimits)
    max_request_bytes: int = 64 * 2**20
    api_keys: tuple[str, ...] = ()  # --api-key: none lets every client in, as one tenant
    read_timeout: float = 30  # --read-timeout: for a request's headers, and its body (see app.MIN_BODY_RATE)
    queue_timeout: float = 300
    max_queue: int = 32
    ui: bool = False
    prefill_chunk: int = PREFILL_CHUNK
    cache_bytes: int = 8 * 2**30  # --cache-gb: embeddings and KV caches kept for follow-up requests
    host: str = "127.0.0.1"  # the bound address: which Host headers name this server
    allowed_hosts: tuple[str, ...] = ()  # --allowed-hosts
    cors_origins: tuple[str, ...] = ()  # --cors-origin


@dataclass
class VLLMSettings:
    """How `--engine vllm` starts vLLM's engine (None: vLLM's own default)."""

    dtype: str = "float32"  # the native engine's choice for --dtype auto: bfloat16 on CUDA, float32 on CPU
    tensor_parallel: int = 1
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    extra_args: str = ""  # --vllm-args: more engine arguments, as `vllm serve` spells them
