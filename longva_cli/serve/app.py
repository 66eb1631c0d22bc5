"""The HTTP server: one LongVA in memory, one generation at a time, OpenAI's wire format.

    app = build_app(LongVA.from_pretrained("lmms-lab/LongVA-7B-DPO"), ServeSettings())

A request passes, in order and before anything is read from its body: the Host, Origin and
Content-Type checks (`guard`), the API key, and a place in the queue (`--max-queue` requests
may be past this point and not yet running: reading their bodies, parsed, or waiting; more get
503 at once). Its body is then read under `--max-request-mb` (to a file under the server's
temporary folder when larger than 1 MiB), checked completely (`openai_format`, off the event
loop; `budget` refuses a prompt longer than `--max-prompt-tokens`) and queued for the single
worker thread that owns the model. The worker reports back through an asyncio queue
(`loop.call_soon_threadsafe`), so streamed text reaches the client as it is generated.

Cancelling: when the client hangs up or the server stops, `Generation.cancelled` is set at
that moment; the worker checks it between frames and tokens. On SIGTERM/SIGINT every waiting
request is answered at once (503, or an error event then `[DONE]` on a stream), and the process
exits 0 even if the model is inside work it cannot interrupt.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from longva_cli.errors import LongVAError
from longva_cli.serve import openai_format as fmt
from longva_cli.serve.guard import HostPolicy, RequestGuard
from longva_cli.serve.openai_format import APIError, ChatJob, MediaItem, RequestLimits

log = logging.getLogger("longva.serve")

MEMORY_BODY_BYTES = 1 << 20  # larger request bodies are written to a file as they arrive
WORKER_STOP_S = 3.0  # after shutdown, how long to wait for the model to give up its request


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
    cache_bytes: int = 8 * 2**30  # --cache-gb: embeddings and KV caches kept for follow-up requests
    host: str = "127.0.0.1"  # the bound address: which Host headers name this server
    allowed_hosts: tuple[str, ...] = ()  # --allowed-hosts
    cors_origins: tuple[str, ...] = ()  # --cors-origin


class ClientGone(Exception):
    """The client hung up while its request waited; nothing is left to answer."""


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down; retry on another server or later.", type="server_error", code="shutting_down")


class Generation:
    """One request's trip through the worker; events go back to the request's event loop.

    `cancelled` is set the moment the client leaves or the server stops: the worker checks it
    between frame batches, prefill chunks and tokens (`engine.drive(..., stop=...)`).
    """

    def __init__(self, job: ChatJob, loop: asyncio.AbstractEventLoop) -> None:
        self.job = job
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.state = "queued"  # -> "running" -> "finished", or -> "withdrawn"; under the worker's lock
        self._loop = loop

    def emit(self, kind: str, payload: Any = None) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is closed: the server is gone, nobody is listening
            pass

    def cancel(self) -> None:
        self.cancelled.set()


class ModelWorker:
    """The one thread that touches the model, and the count of requests admitted to wait for it."""

    def __init__(self, longva, settings: ServeSettings, max_prompt_tokens: int) -> None:
        from longva_cli.engine import RunnerPool, VisualCache

        self.longva = longva
        self.settings = settings
        self.max_prompt_tokens = max_prompt_tokens
        # Recent media and prompts, for follow-ups: a quarter of the budget for embeddings, the rest for KV.
        self.visual_cache = VisualCache(memory_bytes=settings.cache_bytes // 4)
        self.runners = RunnerPool(longva.model.language_model, settings.cache_bytes - settings.cache_bytes // 4, settings.prefill_chunk)
        self._jobs: queue.Queue = queue.Queue()
        # Re-entrant: `close` runs in a signal handler that may interrupt `admit` on the same thread.
        self._lock = threading.RLock()
        self._waiting = 0  # admitted, not yet running: reading a body, parsing, or queued
        self._queued: set[Generation] = set()
        self._current: Generation | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="longva-generate", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def queued(self) -> int:
        return len(self._queued)

    @property
    def busy(self) -> bool:
        return self._current is not None

    def admit(self) -> None:
        """Take a place in the queue before the request's body is read; 503 when none is left."""
        with self._lock:
            if self._closed:
                raise shutting_down()
            if self._waiting >= self.settings.max_queue:
                raise APIError(
                    503, f"the server is busy: {self._waiting} requests are already waiting (--max-queue {self.settings.max_queue}); retry later.",
                    type="server_error", code="queue_full",
                )
            self._waiting += 1

    def leave(self) -> None:
        """Give back the place of an admitted request that will not be queued."""
        with self._lock:
            self._waiting -= 1

    def submit(self, generation: Generation) -> None:
        """Queue an admitted request; on 503 its place is given back and its files released."""
        with self._lock:
            if self._closed:
                self._waiting -= 1
                generation.job.cleanup()
                raise shutting_down()
            self._queued.add(generation)
        self._jobs.put(generation)

    def withdraw(self, generation: Generation) -> bool:
        """Take back a request still in the queue (its client left, or it waited too long) and
        release its files now; False once the worker has it."""
        with self._lock:
            if generation.state != "queued":
                return False
            generation.state = "withdrawn"
            self._queued.discard(generation)
            self._waiting -= 1
        generation.cancel()
        generation.job.cleanup()
        return True

    def close(self) -> None:
        """Refuse new requests; cancel the running one and every queued one, and answer their
        clients now rather than when the model gets round to noticing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            outstanding = [*self._queued, *([self._current] if self._current else [])]
        for generation in outstanding:
            generation.cancel()
            generation.emit("cancelled")
        self._jobs.put(None)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker thread to end; whether it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            generation = self._jobs.get()
            if generation is None:
                break
            with self._lock:
                if generation.state == "withdrawn":
                    continue
                self._queued.discard(generation)
                self._waiting -= 1
                runnable = not self._closed and not generation.cancelled.is_set()
                generation.state = "running" if runnable else "finished"
                self._current = generation if runnable else None
            if not runnable:
                generation.job.cleanup()
                generation.emit("cancelled")
                continue
            generation.emit("started")
            # The last event goes out only after the data: URL files are gone and the held
            # files closed, so a client that has its answer never sees them.
            try:
                final = self._answer(generation)
            finally:
                generation.job.cleanup()
                with self._lock:
                    self._current = None
                    generation.state = "finished"
            generation.emit(*final)
        # Requests still queued when the server stops: `close` has answered them.
        while True:
            try:
                generation = self._jobs.get_nowait()
            except queue.Empty:
                break
            if generation is not None:
                generation.job.cleanup()

    def _answer(self, generation: Generation) -> tuple[str, Any]:
        """Run the request; the final event: ("done", (text, prompt, generated, cached tokens)), ("error", APIError) or ("cancelled", None)."""
        try:
            result = self._generate(generation)
            return ("cancelled", None) if result is None else ("done", result)
        except APIError as err:
            return "error", err
        except LongVAError as err:
            return "error", APIError(400, str(err))
        except MemoryError:
            return "error", APIError(500, "out of memory; send fewer frames or smaller media.", type="server_error", code="out_of_memory")
        except Exception as err:  # noqa: BLE001 - the server must outlive any one request
            log.exception("generation failed for %s", generation.job.id)
            return "error", APIError(500, f"generation failed: {type(err).__name__}: {err}", type="server_error")

    # ---- the model: every call into LongVA is in this method --------------------------------

    def _generate(self, generation: Generation) -> tuple[str, int, int, int] | None:
        """Encode the media, build the prompt, generate; streamed text is emitted as it comes.
        Returns (text, prompt tokens, generated tokens, cached prompt tokens), or None once the
        request is cancelled.

        Media embeddings stay in memory (by content) and the KV caches of recent prompts in a
        pool, so a follow-up (the same video, or the same conversation plus a turn) prefills
        only its new tokens; the answer is the same as a cold request's.
        """
        from longva_cli.engine import Generate, MediaSpec, Token, build, drive, encode, prompt_parts, run
        from longva_cli.engine.memory import check_fits
        from longva_cli.model.prompt import chat_prompt

        job, longva = generation.job, self.longva
        visuals = []
        for item in job.media:
            with media_errors(item):
                visual = drive(encode(longva, MediaSpec(item.path, job.frames, job.fps), self.visual_cache), stop=generation.cancelled.is_set)
            if visual is None:
                return None
            visuals.append(visual)
        job.cleanup()  # encoded: the files from data: URLs and the held files are no longer needed
        sequence = build(longva, prompt_parts(chat_prompt(job.turns, job.system), visuals))
        self.check_prompt_length(len(sequence), job)
        warning = check_fits(longva.model.language_model, len(sequence))
        if warning:
            log.warning(warning)
        generation.emit("ready")
        sampling = longva.sampling_settings(max_new_tokens=job.max_tokens, temperature=job.temperature, top_p=job.top_p, top_k=job.top_k)
        sampling.seed = job.seed

        def stream(event) -> None:
            if job.stream and isinstance(event, Token) and event.text:
                generation.emit("text", event.text)

        runner = self.runners.acquire(sequence)
        generated = drive(run(longva, runner, sequence, Generate(sampling)), stream, stop=generation.cancelled.is_set)
        if generated is None:
            return None
        return generated.text, len(sequence), len(generated.token_ids), generated.reused_tokens

    # ---------------------------------------------------------------------------------------

    def check_prompt_length(self, tokens: int, job: ChatJob) -> None:
        """The exact count, before prefill: the parse-time count estimates videos sampled by fps."""
        if tokens > self.max_prompt_tokens:
            param = "video.frames" if job.fps is not None else "messages"
            raise APIError(
                400, f"the prompt is {tokens:,} tokens, above this server's limit of {self.max_prompt_tokens:,} (--max-prompt-tokens); "
                "ask for fewer frames or send less text.", param=param, code="prompt_too_long",
            )


@contextmanager
def media_errors(item: MediaItem) -> Iterator[None]:
    """A media item the core cannot read becomes a 400 naming the request's field and the
    client's own name for the file (never a temporary file's or a descriptor's)."""
    from PIL import Image

    try:
        yield
    except (LongVAError, Image.DecompressionBombError) as err:
        message = str(err).replace(str(item.path), item.label)
        if isinstance(err, Image.DecompressionBombError):
            message = f"{item.label} is an image too large to decode (over {2 * Image.MAX_IMAGE_PIXELS:,} pixels); send a smaller image."
        raise APIError(400, message, param=item.param, code="invalid_media") from None


def api_error_response(err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


async def read_body(request: Request, limit: int, workdir: Path) -> bytes | Path:
    """The body: bytes, or past MEMORY_BODY_BYTES a file under `workdir` (the caller deletes it).
    Refused with 413 as soon as it passes `limit` bytes, declared or streamed."""
    too_big = APIError(413, f"the request body is larger than this server's limit of {limit / 2**20:g} MiB (--max-request-mb).", code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    body, size, spool, path = bytearray(), 0, None, None
    try:
        async for piece in request.stream():
            size += len(piece)
            if size > limit:
                raise too_big
            if spool is None and size > MEMORY_BODY_BYTES:
                handle, name = tempfile.mkstemp(prefix="body-", suffix=".json", dir=workdir)
                spool, path = os.fdopen(handle, "wb"), Path(name)
                spool.write(body)
                body = None
            if spool is None:
                body += piece
            else:
                spool.write(piece)
    except BaseException as err:
        if spool is not None:
            spool.close()
            path.unlink(missing_ok=True)
        if isinstance(err, ClientDisconnect):
            raise ClientGone from None
        raise
    if spool is None:
        return bytes(body)
    spool.close()
    return path


def parse_body_file(path: Path, *args) -> ChatJob:
    """`parse_chat_body` of a body written to `path`; the file is gone afterwards."""
    try:
        raw = path.read_bytes()
    finally:
        path.unlink(missing_ok=True)
    return fmt.parse_chat_body(raw, *args)


def check_api_key(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'.", code="invalid_api_key")


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def build_app(longva, settings: ServeSettings) -> FastAPI:
    """The FastAPI app around a loaded `LongVA`; starts its worker thread at once.

    `app.state.stop()` (called on SIGINT/SIGTERM, and at the end of the lifespan) refuses new
    work and answers every request in flight.
    """
    from longva_cli.serve.budget import PromptBudget

    workdir = Path(tempfile.mkdtemp(prefix="longva-serve-"))
    budget = PromptBudget.of(longva, settings.limits.max_prompt_tokens)
    worker = ModelWorker(longva, settings, budget.max_tokens)
    created = int(time.time())
    served = {settings.served_model_name, *settings.model_aliases}
    stopping = asyncio.Event()
    large_bodies = asyncio.Semaphore(1)  # parsing holds a few copies of a body: one large one at a time
    loop: list[asyncio.AbstractEventLoop] = []

    def stop() -> None:
        worker.close()
        if loop:
            loop[0].call_soon_threadsafe(stopping.set)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        loop.append(asyncio.get_running_loop())
        yield
        stop()
        shutil.rmtree(workdir, ignore_errors=True)

    app = FastAPI(title="LongVA", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.worker = worker
    app.state.settings = settings
    app.state.stop = stop
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"], max_age=600,
        )
    # Added last, so it runs first: nothing else sees a request it refuses.
    app.add_middleware(RequestGuard, hosts=HostPolicy(settings.host, settings.allowed_hosts), cors_origins=settings.cors_origins)

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
        # waiting: requests admitted and not yet running (bodies being read included); queued: those checked and in line.
        return {"status": "ok", "model": settings.served_model_name, "busy": worker.busy, "waiting": worker.waiting, "queued": worker.queued}

    @app.get("/v1/models")
    async def models(request: Request):
        check_api_key(request, settings.api_key)
        return fmt.models_list([settings.served_model_name], created, longva.name)

    async def receive_job(request: Request) -> ChatJob:
        """Read and check the body of an admitted request."""
        body = await unless_stopping(read_body(request, settings.max_request_bytes, workdir), stopping)
        args = (settings.limits, served, settings.served_model_name, workdir, budget)
        if isinstance(body, bytes):
            # Off the event loop: JSON, base64 and tokenizing take time on large bodies.
            return await asyncio.to_thread(fmt.parse_chat_body, body, *args)
        try:
            async with large_bodies:
                return await asyncio.to_thread(parse_body_file, body, *args)
        finally:
            body.unlink(missing_ok=True)  # if the parse never started

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_api_key(request, settings.api_key)
        worker.admit()  # no byte of the body is read before the request has a place in the queue
        try:
            job = await receive_job(request)
        except BaseException:
            worker.leave()
            raise
        generation = Generation(job, asyncio.get_running_loop())
        worker.submit(generation)
        watcher = asyncio.create_task(watch_disconnect(request, generation))
        try:
            await wait_started(worker, generation, settings.queue_timeout)
            await wait_ready(generation)
            if job.stream:
                watcher.cancel()  # from here the streaming response listens for the hang-up itself
                return StreamingResponse(stream_events(generation), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            kind, payload = await next_event(generation)
        except BaseException:
            if not worker.withdraw(generation):
                generation.cancel()
            raise
        finally:
            watcher.cancel()
        if kind == "error":
            raise payload
        text, prompt_tokens, generated, cached = payload
        return fmt.completion(job, text, fmt.finish_reason(generated, job.max_tokens), prompt_tokens, generated, cached)

    if settings.ui:
        page = resources.files("longva_cli.serve").joinpath("static/index.html").read_text(encoding="utf-8")

        @app.get("/", include_in_schema=False)
        async def root():
            return RedirectResponse("/ui")

        @app.get("/ui", include_in_schema=False)
        async def ui():
            return HTMLResponse(page)

    return app


async def unless_stopping(work, stopping: asyncio.Event):
    """`await work`, or 503 `shutting_down` as soon as the server stops (a slow upload must not
    hold the shutdown up)."""
    task = asyncio.ensure_future(work)
    stop = asyncio.ensure_future(stopping.wait())
    try:
        done, _ = await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    try:
        await task
    except BaseException:  # noqa: BLE001 - cancelled on purpose; the client gets the 503 below
        pass
    raise shutting_down()


async def watch_disconnect(request: Request, generation: Generation) -> None:
    """Tell the worker the moment the client hangs up. The body has been read: the next message
    the server gets for this request is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    generation.cancel()
    generation.events.put_nowait(("gone", None))


async def next_event(generation: Generation, timeout: float | None = None) -> tuple[str, Any]:
    """The worker's next event; ClientGone when the client hung up, 503 when the server stops."""
    kind, payload = await asyncio.wait_for(generation.events.get(), timeout)
    if kind == "gone":
        raise ClientGone
    if kind == "cancelled":
        raise shutting_down()
    return kind, payload


async def wait_started(worker: ModelWorker, generation: Generation, queue_timeout: float) -> None:
    """Returns when the worker takes the job; 503 if it is still queued after `queue_timeout`."""
    try:
        await next_event(generation, queue_timeout)
    except asyncio.TimeoutError:
        if worker.withdraw(generation):
            raise APIError(
                503, f"the server is busy: the request waited {queue_timeout:g} s in the queue (--queue-timeout); retry later.",
                type="server_error", code="queue_timeout",
            ) from None
        await next_event(generation)  # the worker took it just now


async def wait_ready(generation: Generation) -> None:
    """Returns once the media are encoded, so encoding errors are answered 4xx, even for streams."""
    kind, payload = await next_event(generation)
    if kind == "error":
        raise payload


async def stream_events(generation: Generation):
    """Server-sent events in OpenAI's chunk format. If the client leaves, starlette cancels this
    generator (it listens for the disconnect) and the generation is cancelled with it; if the
    server stops, the stream ends with an error event and `[DONE]`."""
    job = generation.job
    try:
        yield sse(fmt.chunk(job, {"role": "assistant", "content": ""}))
        while True:
            try:
                kind, payload = await next_event(generation)
            except APIError as err:
                yield sse(err.body())
                break
            if kind == "text":
                yield sse(fmt.chunk(job, {"content": payload}))
            elif kind == "error":
                yield sse(payload.body())
                break
            elif kind == "done":
                _text, prompt_tokens, generated, cached = payload
                yield sse(fmt.chunk(job, {}, fmt.finish_reason(generated, job.max_tokens)))
                if job.include_usage:
                    yield sse(fmt.usage_chunk(job, prompt_tokens, generated, cached))
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
    """Serve until SIGINT/SIGTERM. At the first signal every request in flight is answered and
    the running generation cancelled; the process then exits 0."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.stop()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5, lifespan="on")
    with _signals_end_cleanly():
        Server(config).run()
    if not app.state.worker.join(WORKER_STOP_S):
        # Native code in the middle of a step it cannot leave (a prefill chunk): letting the
        # interpreter tear down around that thread aborts the process ("terminate called...").
        log.warning("the model is still inside its current step; exiting without waiting for it.")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def serve(
    model: str,
    settings: ServeSettings,
    *,
    port: int = 8000,
    device: str = "auto",
    dtype: str = "auto",
    attn: str = "auto",
    device_map: str | None = None,
    quantize: str | None = None,
    revision: str | None = None,
    log_level: str = "info",
) -> None:
    """Load `model` once and serve it on `settings.host` until SIGINT/SIGTERM."""
    from longva_cli.console import load_model, stderr

    longva = load_model(model, device=device, dtype=dtype, attn=attn, device_map=device_map, quantize=quantize, revision=revision)
    app = build_app(longva, settings)
    host = settings.host
    where = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    stderr.print(f"Serving {settings.served_model_name!r} at {where}/v1" + (f", chat page at {where}/ui" if settings.ui else ""), soft_wrap=True)
    run_server(app, host, port, log_level)
