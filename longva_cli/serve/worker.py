"""What the HTTP layer asks of an engine: admit, queue, run and cancel chat requests.

    worker.check_room()          503 when the queue is full, before the body is read
    worker.admit()               a place in the queue, once the body is read (503 when full)
    worker.submit(generation)    the checked request, in line for the engine
    generation.events            "started", "ready", "text"..., then "done" | "error" | "cancelled"
    worker.withdraw(generation)  take back a request still in line (client gone, queue timeout)
    worker.close()               refuse new work; answer every request in flight now
    worker.join(timeout)         after the server stopped: let the engine go

Two workers implement it: `native.NativeWorker` (one thread, one request at a time, on the
project's engine) and `vllm_worker.VLLMWorker` (vLLM's async engine, requests batched). The
request path in `app` does not know which one it talks to.

`Admission` holds the bookkeeping both share: how many requests wait, which are queued, which
run, and the answers given when the server stops.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import TYPE_CHECKING, Any, Protocol

from longva_cli.errors import LongVAError
from longva_cli.serve.openai_format import APIError, ChatJob

if TYPE_CHECKING:
    from longva_cli.serve.budget import PromptBudget

log = logging.getLogger("longva.serve")


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down; retry on another server or later.", type="server_error", code="shutting_down")


class Generation:
    """One request's trip through a worker; events go back to the request's event loop.

    `cancel()` is called the moment the client leaves or the server stops: the native worker
    checks `cancelled` between frame batches, prefill chunks and tokens; a worker that runs the
    request as an asyncio task sets `task`, which is then cancelled.
    """

    def __init__(self, job: ChatJob, loop: asyncio.AbstractEventLoop) -> None:
        self.job = job
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.state = "queued"  # -> "running" -> "finished", or -> "withdrawn"; under the worker's lock
        self.task: asyncio.Task | None = None
        self._loop = loop

    def emit(self, kind: str, payload: Any = None) -> None:
        self._soon(self.events.put_nowait, (kind, payload))

    def cancel(self) -> None:
        self.cancelled.set()
        if self.task is not None:
            self._soon(self.task.cancel)

    def _soon(self, callback, *args) -> None:
        # Thread- and signal-safe: the worker thread and the signal handler call in here too.
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: the server is gone, nobody is listening
            pass


class Worker(Protocol):
    """An engine behind the HTTP layer (see the module's docstring for the life of a request)."""

    engine: str  # "native" or "vllm", as `GET /health` reports it
    model_root: str  # what the checkpoint was called (`root` in `GET /v1/models`)
    budget: "PromptBudget"  # counts a request's prompt before it is queued

    @property
    def waiting(self) -> int: ...  # admitted, not yet running: parsing, or queued

    @property
    def queued(self) -> int: ...  # checked and in line

    @property
    def busy(self) -> bool: ...  # the engine is working on a request

    def check_room(self) -> None: ...

    def admit(self) -> None: ...

    def leave(self) -> None: ...

    def submit(self, generation: Generation) -> None: ...

    def withdraw(self, generation: Generation) -> bool: ...

    def close(self) -> None: ...

    def join(self, timeout: float | None = None) -> bool: ...


class Admission:
    """The queue bookkeeping of a worker: `--max-queue` places, the requests queued and running.

    Subclasses hand queued requests to their engine (`_enqueue`), call `_start` when one begins,
    `_finish` when it ends, and are told by `_closed_hook` that the server stops.
    """

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        # Re-entrant: `close` runs in a signal handler that may interrupt `admit` on the same thread.
        self._lock = threading.RLock()
        self._waiting = 0
        self._queued: set[Generation] = set()
        self._running: set[Generation] = set()
        self._closed = False

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def queued(self) -> int:
        return len(self._queued)

    @property
    def busy(self) -> bool:
        return bool(self._running)

    def check_room(self) -> None:
        """503 when no place is left in the queue now (checked before a body is read, so a full
        server does not take uploads it cannot queue); takes no place."""
        with self._lock:
            if self._closed:
                raise shutting_down()
            if self._waiting >= self.max_queue:
                raise APIError(
                    503, f"the server is busy: {self._waiting} requests are already waiting (--max-queue {self.max_queue}); retry later.",
                    type="server_error", code="queue_full",
                )

    def admit(self) -> None:
        """Take a place in the queue for a request whose body has been read; 503 when none is left."""
        with self._lock:
            self.check_room()
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
        self._enqueue(generation)

    def withdraw(self, generation: Generation) -> bool:
        """Take back a request still in the queue (its client left, or it waited too long) and
        release its files now; False once the engine has it."""
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
        """Refuse new requests; cancel the running ones and every queued one, and answer their
        clients now rather than when the engine gets round to noticing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            outstanding = [*self._queued, *self._running]
        for generation in outstanding:
            generation.cancel()
            generation.emit("cancelled")
        self._closed_hook()

    def _start(self, generation: Generation) -> bool:
        """Take a queued request off the queue; whether it should run (not withdrawn, cancelled
        or caught by the shutdown). One that should not is answered here."""
        with self._lock:
            if generation.state == "withdrawn":
                return False
            self._queued.discard(generation)
            self._waiting -= 1
            runnable = not self._closed and not generation.cancelled.is_set()
            generation.state = "running" if runnable else "finished"
            if runnable:
                self._running.add(generation)
        if not runnable:
            generation.job.cleanup()
            generation.emit("cancelled")
            return False
        generation.emit("started")
        return True

    def _finish(self, generation: Generation, final: tuple[str, Any]) -> None:
        """The request's files released, then its last event: a client that has its answer never
        sees the data: URL files or the held files."""
        generation.job.cleanup()
        with self._lock:
            self._running.discard(generation)
            generation.state = "finished"
        generation.emit(*final)

    def _enqueue(self, generation: Generation) -> None:
        raise NotImplementedError

    def _closed_hook(self) -> None:
        raise NotImplementedError


def error_event(err: BaseException, job: ChatJob) -> tuple[str, APIError]:
    """The final event of a request that failed: what the client is told."""
    if isinstance(err, APIError):
        return "error", err
    if isinstance(err, LongVAError):
        return "error", APIError(400, str(err))
    if isinstance(err, MemoryError):
        return "error", APIError(500, "out of memory; send fewer frames or smaller media.", type="server_error", code="out_of_memory")
    log.error("generation failed for %s", job.id, exc_info=err)
    return "error", APIError(500, f"generation failed: {type(err).__name__}: {err}", type="server_error")


def check_prompt_length(tokens: int, limit: int, job: ChatJob) -> None:
    """The exact count, before prefill: the parse-time count estimates videos sampled by fps."""
    if tokens > limit:
        param = "video.frames" if job.fps is not None else "messages"
        raise APIError(
            400, f"the prompt is {tokens:,} tokens, above this server's limit of {limit:,} (--max-prompt-tokens); "
            "ask for fewer frames or send less text.", param=param, code="prompt_too_long",
        )
