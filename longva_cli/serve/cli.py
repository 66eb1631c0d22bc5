"""The `longva serve` command: parse and check the flags, then `app.serve` (imported late)."""

from __future__ import annotations

import importlib
import importlib.util
import ipaddress
import os
import socket
from pathlib import Path
from typing import List
from urllib.parse import urlsplit

import typer

from longva_cli import options
from longva_cli.checks import check_flags
from longva_cli.console import stderr
from longva_cli.errors import LongVAError
from longva_cli.hub import DEFAULT_MODEL
from longva_cli.serve.settings import RequestLimits, ServeSettings, VLLMSettings

HELD_FILES = Path("/proc/self/fd")  # how the server reads a file:// file it holds open


def require_serve_extra() -> None:
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise LongVAError(f"`longva serve` needs {' and '.join(missing)}: pip install 'longva[serve]'.")


def require_vllm() -> None:
    """vLLM must be installed and import (a CPU machine's pip may pull CUDA builds that do not)."""
    if importlib.util.find_spec("vllm") is None:
        raise LongVAError("`longva serve --engine vllm` needs vLLM, which is not installed: pip install 'longva[vllm]'.")
    try:
        importlib.import_module("vllm")
    except Exception as err:  # noqa: BLE001 - a broken install fails in many ways
        raise LongVAError(f"vLLM is installed but does not import ({type(err).__name__}: {err}); see README, Serving at scale.") from None


def resolve_engine(engine: str) -> str:
    """"native" or "vllm": `auto` is vLLM when a GPU is visible and vLLM imports, else native."""
    if engine not in ("native", "vllm", "auto"):
        raise LongVAError(f"--engine {engine!r} is not known; use native, vllm or auto.")
    if engine == "vllm":
        require_vllm()
        return engine
    if engine == "native":
        return engine
    import torch

    if not torch.cuda.is_available():
        return "native"
    try:
        require_vllm()
    except LongVAError:
        return "native"
    return "vllm"


def vllm_dtype(dtype: str) -> str:
    """--dtype in vLLM's spelling; auto as the native engine resolves it (bfloat16 on CUDA, float32 on CPU)."""
    import torch

    from longva_cli.engine.loader import DTYPES

    if dtype == "auto":
        return "bfloat16" if torch.cuda.is_available() else "float32"
    if dtype not in DTYPES:
        raise LongVAError(f"--dtype {dtype!r} is not known; use auto, bfloat16, float16 or float32.")
    return str(DTYPES[dtype]).removeprefix("torch.")


def given(ctx: typer.Context, name: str) -> bool:
    """Whether the option `name` was on the command line (a value equal to its default included).
    By name: typer carries its own copy of click, whose enum is not `click.core.ParameterSource`."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def check_engine_flags(engine: str, native_only: dict[str, bool], vllm_only: dict[str, bool]) -> None:
    """A flag the chosen engine would ignore is an error, not a surprise."""
    wrong = [flag for flag, given in (vllm_only if engine == "native" else native_only).items() if given]
    if wrong:
        other = "vllm" if engine == "native" else "native"
        raise LongVAError(f"{', '.join(wrong)} {'applies' if len(wrong) == 1 else 'apply'} to --engine {other}; this server runs on the {engine} engine.")


def check_port_free(host: str, port: int) -> None:
    """Fail before a model that may take minutes to load, not after."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise LongVAError(f"--host {host!r} is not an address this machine can listen on.") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as err:
            raise LongVAError(f"cannot listen on {host}:{port} ({err.strerror}); pick another --port or --host.") from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_host_name(name: str) -> str:
    """An --allowed-hosts value: '*', or a bare host name or address, lower case."""
    cleaned = name.strip().lower().removeprefix("[").removesuffix("]").removesuffix(".")
    if cleaned == "*":
        return cleaned
    try:
        return str(ipaddress.ip_address(cleaned))
    except ValueError:
        pass
    if not cleaned or any(c in cleaned for c in "/@:[] "):
        raise LongVAError(f"--allowed-hosts {name!r} is not a host name; give a name such as gpu-box.internal (no scheme, path or port).")
    return cleaned


def check_origin(origin: str) -> str:
    """A --cors-origin value: '*', 'null' or scheme://host[:port], as browsers send it."""
    if origin in ("*", "null"):
        return origin
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise LongVAError(f"--cors-origin {origin!r} is not an origin; give scheme://host[:port], e.g. http://localhost:3000.")
    return f"{parts.scheme}://{parts.netloc}".lower()


@options.composed
def command(
    ctx: typer.Context,
    model: options.Model = DEFAULT_MODEL,
    host: str = typer.Option(ServeSettings.host, "--host", help="Address to listen on (0.0.0.0 for every interface: set --api-key then)."),
    port: int = typer.Option(8000, "--port", "-p", help="TCP port."),
    served_model_name: str = typer.Option(ServeSettings.served_model_name, "--served-model-name", help="Model id in /v1/models and in requests' `model`."),
    media_root: List[Path] = typer.Option([], "--media-root", help="Folder whose files requests may name as file:// URLs (repeatable; none: file:// is refused)."),
    api_key: List[str] = typer.Option([], "--api-key", envvar="LONGVA_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 (repeatable; also from $LONGVA_API_KEY, several separated by spaces). Each key is a tenant: follow-up reuse never crosses keys.", show_default=False),
    max_frames: int = typer.Option(RequestLimits.max_frames, "--max-frames", help="Most video frames one request may ask for (144 tokens each)."),
    max_tokens_limit: int = typer.Option(RequestLimits.max_tokens, "--max-tokens-limit", help="Most new tokens one request may ask for; also the default max_tokens."),
    max_media: int = typer.Option(RequestLimits.max_media, "--max-media", help="Most images and videos in one request."),
    max_request_mb: float = typer.Option(ServeSettings.max_request_bytes // 2**20, "--max-request-mb", help="Largest request body in MiB (data: URLs are in it, base64 adds a third)."),
    max_queue: int = typer.Option(ServeSettings.max_queue, "--max-queue", help="Requests that may wait for the model once their body is read; more get 503 before their body is read. Bodies being received hold at most this many times --max-request-mb."),
    max_prompt_tokens: int = typer.Option(None, "--max-prompt-tokens", help="Longest prompt in tokens (text + 144 per frame or image crop), checked before any work (default: the model's max_position_embeddings).", show_default=False),
    queue_timeout: float = typer.Option(ServeSettings.queue_timeout, "--queue-timeout", help="Seconds a request may wait for the model before it gets 503."),
    read_timeout: float = typer.Option(ServeSettings.read_timeout, "--read-timeout", help="Seconds a client may take to send a request's headers, and the most its body may pause (the body as a whole: this plus one second per 64 KiB); slower clients get 408."),
    ui: bool = typer.Option(ServeSettings.ui, "--ui", help="Also serve a chat page at /ui (upload a video or image, ask, read the streamed answer)."),
    allowed_hosts: List[str] = typer.Option([], "--allowed-hosts", help="Also accept this name in the Host header (repeatable; '*' for any, only behind a proxy that checks it). Always accepted: the --host address, and loopback names when it is a loopback address.", show_default=False),
    cors_origin: List[str] = typer.Option([], "--cors-origin", help="Let web pages from this origin (scheme://host[:port]) call the API from a browser (repeatable; '*' for any). Other sites' requests are refused with 403.", show_default=False),
    *,
    loading: options.Loading,
    memory_budget: options.MemoryBudget = None,
    revision: options.Revision = None,
    prefill_chunk: options.PrefillChunk = ServeSettings.prefill_chunk,
    cache_gb: float = typer.Option(
        ServeSettings.cache_bytes / 2**30, "--cache-gb", help="With the native engine: memory kept for the visual embeddings and KV caches of recent requests, so a follow-up (same video, or the same conversation plus a turn) prefills only its new tokens; 0 keeps nothing."
    ),
    engine: str = typer.Option(
        "native", "--engine", help="native (this package's engine, one request at a time), vllm (vLLM's engine: requests batched; pip install 'longva[vllm]') or auto (vllm when a GPU is visible and vLLM imports, else native)."
    ),
    tensor_parallel: int = typer.Option(VLLMSettings.tensor_parallel, "--tensor-parallel", help="With --engine vllm: GPUs one model is split over (vLLM's --tensor-parallel-size)."),
    max_model_len: int = typer.Option(None, "--max-model-len", help="With --engine vllm: the longest sequence, prompt and answer (default: the model's max_position_embeddings).", show_default=False),
    gpu_memory_utilization: float = typer.Option(None, "--gpu-memory-utilization", help="With --engine vllm: the share of each GPU's memory vLLM may take, weights and KV cache (default: vLLM's, 0.92).", show_default=False),
    vllm_args: str = typer.Option("", "--vllm-args", help="With --engine vllm: more engine arguments as `vllm serve` spells them, e.g. \"--pipeline-parallel-size 2 --distributed-executor-backend ray\".", show_default=False),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level: critical, error, warning, info, debug."),
) -> None:
    """Serve LongVA over an OpenAI-compatible HTTP API (chat completions with images and videos).

    One model stays in memory. The native engine answers one request at a time (others wait in
    a queue); --engine vllm hands requests to vLLM's engine, which batches them.
    Media come as data: URLs or, for folders named with --media-root, as file:// URLs.
    Per-request video options go in a top-level "video" field: {"frames": 64} or {"fps": 1}.

    examples:
      longva serve --model lmms-lab/LongVA-7B-DPO --host 127.0.0.1 --port 8000
      longva serve --media-root /data/videos --max-frames 128 --ui
      longva serve --engine vllm --model lmms-lab/LongVA-7B-DPO --tensor-parallel 2 --max-model-len 65536
      curl localhost:8000/v1/models
    """
    require_serve_extra()
    whole = {"integer": True, "at_least": 1}
    check_flags(
        ("--port", port, {"integer": True, "at_least": 1, "at_most": 65535}),
        ("--max-frames", max_frames, whole),
        ("--max-tokens-limit", max_tokens_limit, whole),
        ("--max-media", max_media, whole),
        ("--max-request-mb", max_request_mb, {"above": 0}),
        ("--max-queue", max_queue, whole),
        ("--max-prompt-tokens", max_prompt_tokens, whole),
        ("--queue-timeout", queue_timeout, {"above": 0}),
        ("--read-timeout", read_timeout, {"above": 0}),
        ("--prefill-chunk", prefill_chunk, whole),
        ("--cache-gb", cache_gb, {"at_least": 0}),
        ("--tensor-parallel", tensor_parallel, whole),
        ("--max-model-len", max_model_len, {"integer": True, "at_least": 2}),
        ("--gpu-memory-utilization", gpu_memory_utilization, {"above": 0, "at_most": 1}),
    )
    chosen = resolve_engine(engine)
    check_engine_flags(
        chosen,
        native_only={"--device": loading.device not in (None, "auto"), "--attn": loading.attn not in (None, "auto"),
                     "--device-map": loading.device_map is not None, "--quantize": loading.quantize is not None,
                     "--quantize-backend": given(ctx, "quantize_backend"), "--prefill-chunk": given(ctx, "prefill_chunk"),
                     "--cache-gb": given(ctx, "cache_gb"), "--kv-cache": loading.kv_cache not in (None, "auto"),
                     "--memory-budget": memory_budget is not None},
        vllm_only={"--tensor-parallel": tensor_parallel != VLLMSettings.tensor_parallel, "--max-model-len": max_model_len is not None,
                   "--gpu-memory-utilization": gpu_memory_utilization is not None, "--vllm-args": bool(vllm_args.strip())},
    )
    roots = []
    for root in media_root:
        resolved = root.expanduser().resolve()
        if not resolved.is_dir():
            raise LongVAError(f"--media-root {root} is not a folder.")
        roots.append(resolved)
    if roots and not HELD_FILES.is_dir():
        raise LongVAError(f"--media-root needs {HELD_FILES} (Linux) to read exactly the file it checked; send media as data: URLs on this system.")
    if any(not key.strip() for key in api_key):
        raise LongVAError("--api-key is empty; give a key or leave the flag out.")
    hosts = tuple(check_host_name(name) for name in allowed_hosts)
    origins = tuple(check_origin(origin) for origin in cors_origin)
    check_port_free(host, port)
    if not is_loopback(host) and not api_key:
        stderr.print(f"[yellow]warning:[/yellow] listening on {host} without --api-key: anyone who can reach this port can use the model.")

    from longva_cli.serve.app import serve

    settings = ServeSettings(
        served_model_name=served_model_name,
        model_aliases=(model, Path(model).name),
        limits=RequestLimits(media_roots=tuple(roots), max_frames=max_frames, max_tokens=max_tokens_limit, max_media=max_media,
                             max_prompt_tokens=max_prompt_tokens),
        max_request_bytes=int(max_request_mb * 2**20),
        api_keys=tuple(api_key),
        read_timeout=read_timeout,
        queue_timeout=queue_timeout,
        max_queue=max_queue,
        ui=ui,
        prefill_chunk=prefill_chunk,
        cache_bytes=int(cache_gb * 2**30),
        host=host,
        allowed_hosts=hosts,
        cors_origins=origins,
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the worker thread tokenizes; no fork warnings
    vllm = None
    if chosen == "vllm":
        vllm = VLLMSettings(dtype=vllm_dtype(loading.dtype or "auto"), tensor_parallel=tensor_parallel, max_model_len=max_model_len,
                            gpu_memory_utilization=gpu_memory_utilization, extra_args=vllm_args)
    serve(model, settings, engine=chosen, port=port, revision=revision, vllm=vllm, log_level=log_level, memory_budget=memory_budget,
          **vars(loading))
