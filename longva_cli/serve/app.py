"""The HTTP server: one LongVA in memory, one generation at a time, OpenAI's wire format.

    app = build_app(LongVA.from_pretrained("lmms-lab/LongVA-7B-DPO"), ServeSettings())

Requests are checked completely (`openai_format`, off the event loop), then queued for a
single worker thread that owns the model: it encodes the media, builds the prompt and
generates with the same `LongVA` methods `longva ask` uses. The worker reports back through
an asyncio queue (`loop.call_soon_threadsafe`), so streamed text reaches the client as it is
generated. A request arriving when `max_queue` requests already wait is answered 503 at once;
one still waiting after `queue_timeout` seconds, 503 then.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import queue
import shutil
import signal
import tempfile
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, StreamingResponse
from starlette.exceptions import HTTPException

from longva_cli.errors import LongVAError
from longva_cli.serve import openai_format as fmt
from longva_cli.serve.openai_format import APIError, ChatJob, RequestLimits

log = logging.getLogger("longva.serve")

DISCONNECT_POLL_S = 0.5  # how often a waiting request checks that its client is still there


@dataclass
class ServeSettings:
    """Server-wide settings (the `longva serve` flags other than loading the model)."""

    served_model_name: str = "longva"
    model_aliases: tuple[str, ...] = ()  # other names accepted in `model` (the --model argument)
    limits: RequestLimits = field(default_factory=RequestLimits)
    max_request_bytes: int = 64 * 2**20
    api_key: str | None = None
    queue_timeout: float = 300.0
    max_queue: int = 32
    ui: bool = False
    prefill_chunk: int = 4096


class Cancelled(Exception):
    """Raised inside the worker when the client went away or the server is stopping."""


class ClientGone(Exception):
    """The client hung up while its request waited; nothing is left to answer."""


class Generation:
    """One request's trip through the worker; events go back to the request's event loop."""

    def __init__(self, job: ChatJob, loop: asyncio.AbstractEventLoop) -> None:
        self.job = job
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self._loop = loop
        self._lock = threading.Lock()
        self._state = "queued"

    def emit(self, kind: str, payload: Any = None) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is closed: the server is gone, nobody is listening
            pass

    def start(self) -> bool:
        """Worker side: claim the job; False when it was cancelled while queued."""
        with self._lock:
            if self._state != "queued" or self.cancelled.is_set():
                self._state = "cancelled"
                return False
            self._state = "running"
        return True

    def withdraw(self) -> bool:
        """Request side: give up a job still waiting in the queue; False once it runs."""
        with self._lock:
            if self._state == "queued":
                self._state = "cancelled"
                self.cancelled.set()
                return True
            return False

    def cancel(self) -> None:
        self.cancelled.set()

    def check(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled


class ModelWorker:
    """The one thread that touches the model, fed by a bounded count of waiting jobs."""

    def __init__(self, longva, settings: ServeSettings) -> None:
        self.longva = longva
        self.settings = settings
        self._jobs: queue.Queue = queue.Queue()
        # Re-entrant: `close` runs in a signal handler that may interrupt `submit` on the same thread.
        self._lock = threading.RLock()
        self._waiting = 0
        self._current: Generation | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="longva-generate", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def busy(self) -> bool:
        return self._current is not None

    def submit(self, generation: Generation) -> None:
        with self._lock:
            if self._closed:
                raise APIError(503, "the server is shutting down.", type="server_error", code="shutting_down")
            if self._waiting >= self.settings.max_queue:
                raise APIError(
                    503, f"the server is busy: {self._waiting} requests are already waiting (--max-queue {self.settings.max_queue}); retry later.",
                    type="server_error", code="queue_full",
                )
            self._waiting += 1
        self._jobs.put(generation)

    def close(self, timeout: float = 5.0) -> None:
        """Refuse new jobs, cancel the running one and every waiting one, stop the thread."""
        with self._lock:
            self._closed = True
            current = self._current
        if current is not None:
            current.cancel()
        self._jobs.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            generation = self._jobs.get()
            if generation is None:
                break
            with self._lock:
                self._waiting -= 1
                closed = self._closed
                self._current = generation
            if closed:
                generation.cancel()
            # The last event goes out only after the data: URL files are gone, so a client
            # that has its answer never sees them.
            try:
                if generation.start():
                    generation.emit("started")
                    final = self._answer(generation)
                else:
                    final = ("cancelled", None)
            finally:
                generation.job.cleanup()
                with self._lock:
                    self._current = None
            generation.emit(*final)
        # Jobs still queued when the server stops: their requests end with "shutting down".
        while True:
            try:
                generation = self._jobs.get_nowait()
            except queue.Empty:
                break
            if generation is not None:
                generation.job.cleanup()
                generation.emit("cancelled")

    def _answer(self, generation: Generation) -> tuple[str, Any]:
        """Encode, build the prompt, generate; streamed text is emitted, the final event returned."""
        job, longva = generation.job, self.longva
        from longva_cli.model.prompt import chat_prompt

        try:
            progress = lambda _done: generation.check()  # noqa: E731 - a callback that stops encoding early
            visuals = [longva.encode_media(item.path, frames=job.frames, fps=job.fps, on_progress=progress) for item in job.media]
            job.cleanup()  # encoded: the files from data: URLs are no longer needed
            embeds, _text_tokens = longva.prompt_embeds(chat_prompt(job.turns, job.system), visuals)
            warning = longva.check_fits(len(embeds))
            if warning:
                log.warning(warning)
            generation.emit("ready")
            sampling = longva.sampling_settings(max_new_tokens=job.max_tokens, temperature=job.temperature, top_p=job.top_p, top_k=job.top_k)
            sampling.seed = job.seed
            on_text = (lambda text: generation.emit("text", text)) if job.stream else None
            text, generated = longva.generate_text(
                embeds, sampling, on_text, self.settings.prefill_chunk, on_token=lambda _id: generation.check()
            )
            return "done", (text, len(embeds), generated)
        except Cancelled:
            return "cancelled", None
        except LongVAError as err:  # bad media and the like: the client's to fix
            message = str(err)
            for item in job.media:
                message = message.replace(str(item.path), item.label)
            return "error", APIError(400, message, code="invalid_media")
        except MemoryError:
            return "error", APIError(500, "out of memory; send fewer frames or smaller media.", type="server_error", code="out_of_memory")
        except Exception as err:  # noqa: BLE001 - the server must outlive any one request
            log.exception("generation failed for %s", job.id)
            return "error", APIError(500, f"generation failed: {type(err).__name__}: {err}", type="server_error")


def api_error_response(err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (declared or streamed)."""
    too_big = APIError(413, f"the request body is larger than this server's limit of {limit / 2**20:g} MiB (--max-request-mb).", code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise too_big
    return bytes(body)


def check_api_key(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'.", code="invalid_api_key")


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def build_app(longva, settings: ServeSettings) -> FastAPI:
    """The FastAPI app around a loaded `LongVA`; starts its worker thread at once."""
    workdir = Path(tempfile.mkdtemp(prefix="longva-serve-"))
    worker = ModelWorker(longva, settings)
    created = int(time.time())
    served = {settings.served_model_name, *settings.model_aliases}

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        worker.close()
        shutil.rmtree(workdir, ignore_errors=True)

    app = FastAPI(title="LongVA", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.worker = worker
    app.state.settings = settings

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, err: APIError):
        return api_error_response(err)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, err: HTTPException):
        message = f"{request.method} {request.url.path}: {str(err.detail).lower()}."
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(fmt.error_body(message, kind), status_code=err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(ClientGone)
    async def _client_gone(_request: Request, _err: ClientGone):
        # Nobody reads this; the status only shows in the access log (nginx's "client closed request").
        return JSONResponse(fmt.error_body("the client closed the connection."), status_code=499)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, err: Exception):
        log.exception("request failed", exc_info=err)
        return JSONResponse(fmt.error_body(f"internal error: {type(err).__name__}: {err}", "server_error"), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.served_model_name, "busy": worker.busy, "waiting": worker.waiting}

    @app.get("/v1/models")
    async def models(request: Request):
        check_api_key(request, settings.api_key)
        return fmt.models_list([settings.served_model_name], created, longva.name)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_api_key(request, settings.api_key)
        raw = await read_body(request, settings.max_request_bytes)
        # Off the event loop: a large body means megabytes of JSON and base64 to decode.
        job = await asyncio.to_thread(fmt.parse_chat_body, raw, settings.limits, served, settings.served_model_name, workdir)
        generation = Generation(job, asyncio.get_running_loop())
        try:
            worker.submit(generation)
        except APIError:
            job.cleanup()
            raise
        try:
            await wait_started(generation, request, settings.queue_timeout)
            await wait_ready(generation, request)
        except BaseException:
            generation.cancel()
            raise
        if job.stream:
            return StreamingResponse(stream_events(generation, request), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            kind, payload = await next_event(generation, request)
        finally:
            generation.cancel()
        if kind == "error":
            raise payload
        text, prompt_tokens, generated = payload
        return fmt.completion(job, text, fmt.finish_reason(generated, job.max_tokens), prompt_tokens, generated)

    if settings.ui:
        page = resources.files("longva_cli.serve").joinpath("static/index.html").read_text(encoding="utf-8")

        @app.get("/", include_in_schema=False)
        async def root():
            return RedirectResponse("/ui")

        @app.get("/ui", include_in_schema=False)
        async def ui():
            return HTMLResponse(page)

    return app


async def next_event(generation: Generation, request: Request, timeout: float | None = None) -> tuple[str, Any]:
    """The worker's next event; raises ClientGone when the client hangs up while waiting."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        wait = DISCONNECT_POLL_S if deadline is None else min(DISCONNECT_POLL_S, max(deadline - time.monotonic(), 0))
        try:
            kind, payload = await asyncio.wait_for(generation.events.get(), wait)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise ClientGone from None
            if deadline is not None and time.monotonic() >= deadline:
                raise
            continue
        if kind == "cancelled":
            raise APIError(503, "the request was cancelled: the server is shutting down.", type="server_error", code="shutting_down")
        return kind, payload


async def wait_started(generation: Generation, request: Request, queue_timeout: float) -> None:
    """Returns when the worker takes the job; 503 if it is still queued after `queue_timeout`."""
    try:
        await next_event(generation, request, queue_timeout)
    except asyncio.TimeoutError:
        if generation.withdraw():
            raise APIError(
                503, f"the server is busy: the request waited {queue_timeout:g} s in the queue (--queue-timeout); retry later.",
                type="server_error", code="queue_timeout",
            ) from None
        await next_event(generation, request)  # the worker took it just now


async def wait_ready(generation: Generation, request: Request) -> None:
    """Returns once the media are encoded, so encoding errors are answered 4xx, even for streams."""
    kind, payload = await next_event(generation, request)
    if kind == "error":
        raise payload


async def stream_events(generation: Generation, request: Request):
    """Server-sent events in OpenAI's chunk format; the generation stops if the client leaves
    (seen when a write fails, or by polling while the model's text is held back)."""
    job = generation.job
    try:
        yield sse(fmt.chunk(job, {"role": "assistant", "content": ""}))
        while True:
            try:
                kind, payload = await next_event(generation, request)
            except ClientGone:
                return
            except APIError as err:
                yield sse(err.body())
                break
            if kind == "text":
                yield sse(fmt.chunk(job, {"content": payload}))
            elif kind == "error":
                yield sse(payload.body())
                break
            elif kind == "done":
                _text, prompt_tokens, generated = payload
                yield sse(fmt.chunk(job, {}, fmt.finish_reason(generated, job.max_tokens)))
                if job.include_usage:
                    yield sse(fmt.usage_chunk(job, prompt_tokens, generated))
                break
        yield sse("[DONE]")
    finally:
        generation.cancel()


@contextmanager
def _signals_end_cleanly():
    """uvicorn re-raises SIGINT/SIGTERM after its graceful shutdown; make that a no-op so a
    stopped server exits 0 instead of with a KeyboardInterrupt or a signal status."""
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in handled}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_server(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM; the running generation is cancelled at the first signal."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.worker.close(timeout=0)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5, lifespan="on")
    with _signals_end_cleanly():
        Server(config).run()


def serve(
    model: str,
    settings: ServeSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    dtype: str = "auto",
    attn: str = "auto",
    device_map: str | None = None,
    quantize: str | None = None,
    revision: str | None = None,
    log_level: str = "info",
) -> None:
    """Load `model` once and serve it until SIGINT/SIGTERM."""
    from longva_cli.ask import load
    from longva_cli.console import stderr

    longva = load(model, device=device, dtype=dtype, attn=attn, device_map=device_map, quantize=quantize, revision=revision)
    app = build_app(longva, settings)
    where = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    stderr.print(f"Serving {settings.served_model_name!r} at {where}/v1" + (f", chat page at {where}/ui" if settings.ui else ""), soft_wrap=True)
    run_server(app, host, port, log_level)
