"""The HTTP server: OpenAI's wire format in front of an engine worker.

    worker = NativeWorker(LongVA.from_pretrained("lmms-lab/LongVA-7B-DPO"), settings)
    app = build_app(worker, settings)

A request passes, in order and before anything is read from its body: the Host, Origin and
Content-Type checks (`guard`), the API key (which names the request's tenant), and a look at
the queue (when `--max-queue` requests are already waiting, 503 at once). Its body is then read
under `--max-request-mb` (to a file under the server's temporary folder when larger than 1 MiB)
and `--read-timeout` (a client that sends too slowly gets 408), holding no place in the queue:
slow clients cannot keep others out. Only then does the request take its place in the queue,
is checked completely (`openai_format`, off the event loop; `budget` refuses a prompt longer
than `--max-prompt-tokens`) and is queued for the worker (`worker`: the native engine's one
thread, or vLLM's async engine). The worker reports back through an asyncio queue, so streamed
text reaches the client as it is generated.

Tenants: each `--api-key` is one tenant (without keys every client is the same one). Follow-up
reuse (KV caches, visual embeddings, vLLM's prefix cache) stays within a tenant, so neither
`cached_tokens` nor the time an answer takes tells one tenant what another sent.

Cancelling: when the client hangs up or the server stops, `Generation.cancel()` is called at
that moment; the native engine stops at its next frame batch, prefill chunk or token, vLLM
aborts the request. On SIGTERM/SIGINT every waiting request is answered at once (503, or an
error event then `[DONE]` on a stream), and the process exits 0 even if the model is inside
work it cannot interrupt.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from longva_cli.serve import openai_format as fmt
from longva_cli.serve.guard import HostPolicy, RequestGuard
from longva_cli.serve.openai_format import APIError, ChatJob
from longva_cli.serve.settings import ServeSettings, VLLMSettings
from longva_cli.serve.worker import Generation, Worker, shutting_down

log = logging.getLogger("longva.serve")

MEMORY_BODY_BYTES = 1 << 20  # larger request bodies are written to a file as they arrive
# A body may take --read-timeout seconds plus one second per MIN_BODY_RATE bytes (64 MiB: 17
# minutes at this rate), with no pause longer than --read-timeout: a large upload on a slow link
# passes, a byte at a time does not.
MIN_BODY_RATE = 64 * 1024
WORKER_STOP_S = 3.0  # after shutdown, how long to wait for the model to give up its request


class ClientGone(Exception):
    """The client hung up while its request waited; nothing is left to answer."""


def api_error_response(err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    if err.status in (408, 413):  # the rest of the body is not read: the connection cannot carry another request
        headers = {"Connection": "close"}
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


class UploadRoom:
    """The request bodies being received, all together under `limit` bytes.

    A body being read holds no place in the queue (a slow client would keep everyone out); this
    bounds the memory and disk such bodies take instead, by what they hold: a client trickling
    bytes holds next to nothing, and only for `--read-timeout`.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.bodies = 0  # bodies being received (`uploading` in GET /health)

    def check(self, size: int) -> None:
        """503 when `size` more bytes do not fit now."""
        if self.held + size > self.limit:
            raise APIError(
                503, f"the server is receiving {self.limit / 2**20:g} MiB of request bodies already (--max-queue x --max-request-mb); retry later.",
                type="server_error", code="uploads_full",
            )

    def take(self, size: int) -> None:
        self.check(size)
        self.held += size


async def read_body(request: Request, limit: int, workdir: Path, room: UploadRoom, timeout: float) -> bytes | Path:
    """The body: bytes, or past MEMORY_BODY_BYTES a file under `workdir` (the caller deletes it).

    Refused with 413 as soon as it passes `limit` bytes, declared or streamed; with 408 when it
    pauses longer than `timeout` or arrives slower than MIN_BODY_RATE once `timeout` is spent;
    with 503 when the bodies being received at once would pass the `room`.
    """
    too_big = APIError(413, f"the request body is larger than this server's limit of {limit / 2**20:g} MiB (--max-request-mb).", code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit():
        if int(declared) > limit:
            raise too_big
        room.check(int(declared))  # refused at once when it cannot fit now; held only as it arrives
    loop = asyncio.get_running_loop()
    started = loop.time()
    body, size, spool, path = bytearray(), 0, None, None
    room.bodies += 1
    pieces = request.stream().__aiter__()
    try:
        while True:
            # The next piece within `timeout`, and the whole body within `timeout` + size / rate.
            wait = min(timeout, started + timeout + size / MIN_BODY_RATE - loop.time())
            try:
                piece = await asyncio.wait_for(pieces.__anext__(), wait)
            except StopAsyncIteration:
                break
            room.take(len(piece))
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
        if isinstance(err, asyncio.TimeoutError):  # TimeoutError itself from Python 3.11
            raise APIError(
                408, f"the request body arrived too slowly ({size:,} bytes in {loop.time() - started:.0f} s; this server waits "
                f"{timeout:g} s at most between pieces, and {timeout:g} s plus one per {MIN_BODY_RATE // 1024} KiB in all: --read-timeout).",
                code="request_timeout",
            ) from None
        raise
    finally:
        room.held -= size
        room.bodies -= 1
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


def tenant_of(request: Request, api_keys: tuple[str, ...]) -> str:
    """The tenant the request's API key names: a digest of the key (never the key itself, which
    vLLM's cache salt would carry); "" for everyone on a server without keys. 401 for a missing
    or wrong key."""
    if not api_keys:
        return ""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    sent = token.strip().encode()
    # Every key is compared, in constant time, so the time taken says nothing about which matched.
    matches = [hmac.compare_digest(sent, key.encode()) for key in api_keys]
    if scheme.lower() != "bearer" or not any(matches):
        raise APIError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'.", code="invalid_api_key")
    return hashlib.sha256(sent).hexdigest()[:32]


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def build_app(worker: Worker, settings: ServeSettings) -> FastAPI:
    """The FastAPI app in front of a started worker.

    `app.state.stop()` (called on SIGINT/SIGTERM, and at the end of the lifespan) refuses new
    work and answers every request in flight.
    """
    workdir = Path(tempfile.mkdtemp(prefix="longva-serve-"))
    budget = worker.budget
    created = int(time.time())
    served = {settings.served_model_name, *settings.model_aliases}
    stopping = asyncio.Event()
    uploads = UploadRoom(settings.max_queue * settings.max_request_bytes)
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
        # uploading: bodies being received; waiting: requests read, not yet running; queued: those checked and in line.
        return {
            "status": "ok", "model": settings.served_model_name, "engine": worker.engine, "busy": worker.busy,
            "uploading": uploads.bodies, "waiting": worker.waiting, "queued": worker.queued,
        }

    @app.get("/v1/models")
    async def models(request: Request):
        tenant_of(request, settings.api_keys)
        return fmt.models_list([settings.served_model_name], created, worker.model_root)

    async def receive_job(request: Request, tenant: str) -> ChatJob:
        """Read the body (holding no place in the queue), then take a place and check it."""
        body = await unless_stopping(read_body(request, settings.max_request_bytes, workdir, uploads, settings.read_timeout), stopping)
        try:
            worker.admit()
        except BaseException:
            if isinstance(body, Path):
                body.unlink(missing_ok=True)
            raise
        args = (settings.limits, served, settings.served_model_name, workdir, budget)
        try:
            if isinstance(body, bytes):
                # Off the event loop: JSON, base64 and tokenizing take time on large bodies.
                job = await asyncio.to_thread(fmt.parse_chat_body, body, *args)
            else:
                try:
                    async with large_bodies:
                        job = await asyncio.to_thread(parse_body_file, body, *args)
                finally:
                    body.unlink(missing_ok=True)  # if the parse never started
        except BaseException:
            worker.leave()
            raise
        job.tenant = tenant
        return job

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        tenant = tenant_of(request, settings.api_keys)
        worker.check_room()  # a full queue refuses before any byte of the body is read
        job = await receive_job(request, tenant)
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


async def wait_started(worker: Worker, generation: Generation, queue_timeout: float) -> None:
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


def header_deadline_protocol(timeout: float) -> type:
    """uvicorn's HTTP/1.1 protocol (h11) with a deadline on each request's headers: `timeout`
    seconds from the connection's start, or from the previous response on a kept-alive one.

    uvicorn itself waits for headers as long as a client keeps sending them (one byte a minute
    holds a connection forever). A connection still inside its headers at the deadline gets
    408 and is closed; an idle one is just closed. The body's own limits are `read_body`'s.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    message = fmt.error_body(f"the request headers did not arrive within {timeout:g} s (--read-timeout).", code="request_timeout")
    body = json.dumps(message).encode()
    late = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body))

    class HeaderDeadline(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # a kept-alive connection's next request

        def connection_lost(self, exc) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(timeout, self._headers_due)

        def _headers_due(self) -> None:
            # IDLE: h11 has not seen a whole request line and headers since the deadline was set.
            if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
                return
            if self.conn.trailing_data[0]:  # part of a request came: say why it is dropped
                self.transport.write(late)
            self.transport.close()

    return HeaderDeadline


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


def run_server(start_worker: Callable[[], Worker | Awaitable[Worker]], settings: ServeSettings, port: int, log_level: str = "info") -> None:
    """Start the worker, then serve until SIGINT/SIGTERM. At the first signal every request in
    flight is answered and the running generations cancelled; the process then exits 0.

    The worker starts inside the server's event loop (vLLM's async engine lives in it); an
    error while it starts (a `LongVAError`) ends the command before anything listens.
    """
    import uvicorn

    from longva_cli.console import stderr

    started: list[Worker] = []

    async def main() -> None:
        worker = start_worker()
        if inspect.isawaitable(worker):
            worker = await worker
        started.append(worker)
        app = build_app(worker, settings)

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame) -> None:
                app.state.stop()
                super().handle_exit(sig, frame)

        host = settings.host
        config = uvicorn.Config(
            app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5, lifespan="on",
            http=header_deadline_protocol(settings.read_timeout),
        )
        where = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
        stderr.print(
            f"Serving {settings.served_model_name!r} on the {worker.engine} engine at {where}/v1" + (f", chat page at {where}/ui" if settings.ui else ""),
            soft_wrap=True,
        )
        with _signals_end_cleanly():
            await Server(config).serve()

    try:
        asyncio.run(main())
    finally:
        for worker in started:
            worker.close()
            if not worker.join(WORKER_STOP_S):
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
    engine: str = "native",
    port: int = 8000,
    revision: str | None = None,
    vllm: VLLMSettings | None = None,
    log_level: str = "info",
    memory_budget: str | None = None,
    **loading,
) -> None:
    """Load `model` on `engine` ("native" or "vllm") and serve it on `settings.host` until SIGINT/SIGTERM.

    `loading`: how the native engine loads the model, as `engine.loader.load` takes it (device,
    dtype, attn, kv_cache, ...); vLLM is set up by `vllm` instead. The native engine is first
    planned for the largest request the limits let in (`--max-frames` frames, `--max-tokens-limit`
    new tokens) and loaded with the cheapest settings that fit `memory_budget` (None: the
    device's free memory; engine/plan.py) less the cache of recent requests (`--cache-gb`)."""
    if engine == "vllm":
        # vLLM reads its log level when it is imported.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", {"trace": "DEBUG"}.get(log_level, log_level.upper()))
        from longva_cli.serve import vllm_worker

        run_server(lambda: vllm_worker.start(model, settings, vllm or VLLMSettings(), revision), settings, port, log_level)
        return
    from longva_cli.display import load_model, say_plan
    from longva_cli.engine.plan import fit_budget, plan_for
    from longva_cli.options import Loading
    from longva_cli.serve.native import NativeWorker

    asked, limits = Loading(**loading), settings.limits  # what is not given takes its default
    fitted = fit_budget(
        lambda: plan_for(
            model, None, images=limits.max_frames, max_new_tokens=limits.max_tokens, prefill_chunk=settings.prefill_chunk,
            device=asked.device, dtype=asked.dtype, quantize=asked.quantize, kv_cache=asked.kv_cache, budget=memory_budget,
            revision=revision, kept_aside=settings.cache_bytes,
        ),
        say_plan, quantize=asked.quantize, kv_cache=asked.kv_cache, device_map=asked.device_map, frames_flag="--max-frames",
    )
    loaded = replace(asked, quantize=fitted.quantize, kv_cache=fitted.kv_cache)
    longva = load_model(model, revision=revision, **vars(loaded))
    run_server(lambda: NativeWorker(longva, settings, fitted.visual_tokens_on_host), settings, port, log_level)
