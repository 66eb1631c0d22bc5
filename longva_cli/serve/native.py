"""The native worker: one LongVA in this process, one thread that owns it, one request at a time.

Requests wait in a queue for the thread. Media embeddings stay in memory (by content) and the
KV caches of recent prompts in a pool (`--cache-gb`), so a follow-up (the same video, or the
same conversation plus a turn) prefills only its new tokens; the answer is the same as a cold
request's. Both are kept per tenant (API key) within one shared budget: a request never reuses
what another tenant's left, so it is not faster for it either. A cancelled request stops at its
next frame batch, prefill chunk or token.
"""

from __future__ import annotations

import logging
import queue
import threading

from longva_cli.serve.openai_format import media_errors
from longva_cli.serve.worker import Admission, Generation, check_prompt_length, error_event

log = logging.getLogger("longva.serve")


class TenantCache:
    """One tenant's part of the server's in-memory visual cache: `encode` finds there only the
    embeddings this tenant's requests made. The tenants share one memory budget (the entries
    of all of them are evicted least recently used first)."""

    def __init__(self, shared, tenant: str) -> None:
        self.shared = shared  # the server's VisualCache (in memory, no folder)
        self.tenant = tenant

    def remembered(self, key: dict):
        return self.shared.remembered({**key, "tenant": self.tenant})

    def remember(self, key: dict, value, nbytes: int) -> None:
        self.shared.remember({**key, "tenant": self.tenant}, value, nbytes)

    def entry(self, key: dict) -> None:
        return None  # nothing on disk: a server keeps its requests' embeddings in memory only

    def file_hash(self, path) -> str:
        return self.shared.file_hash(path)  # a file's content hash says nothing about who sent it


class NativeWorker(Admission):
    """The one thread that touches the model, and the count of requests admitted to wait for it."""

    engine = "native"

    def __init__(self, longva, settings, visual_tokens_on_host: bool = False) -> None:
        from longva_cli.engine.runner import RunnerPool
        from longva_cli.engine.visual_cache import VisualCache
        from longva_cli.serve.budget import PromptBudget

        super().__init__(settings.max_queue)
        self.longva = longva
        self.visual_tokens_on_host = visual_tokens_on_host  # the memory plan's choice (app.serve)
        self.model_root = longva.name
        self.budget = PromptBudget.of(longva, settings.limits.max_prompt_tokens)
        # Recent media and prompts, for follow-ups: a quarter of the budget for embeddings, the rest for KV.
        self.visual_cache = VisualCache(memory_bytes=settings.cache_bytes // 4)
        self.runners = RunnerPool(longva.model.language_model, settings.cache_bytes - settings.cache_bytes // 4, settings.prefill_chunk)
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="longva-generate", daemon=True)
        self._thread.start()

    def _enqueue(self, generation: Generation) -> None:
        self._jobs.put(generation)

    def _closed_hook(self) -> None:
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
            if not self._start(generation):
                continue
            try:
                final = self._answer(generation)
            except BaseException:
                self._finish(generation, ("cancelled", None))
                raise
            self._finish(generation, final)
        # Requests still queued when the server stops: `close` has answered them.
        while True:
            try:
                generation = self._jobs.get_nowait()
            except queue.Empty:
                break
            if generation is not None:
                generation.job.cleanup()

    def _answer(self, generation: Generation):
        """Run the request; the final event: ("done", (text, prompt, generated, cached tokens)), ("error", APIError) or ("cancelled", None)."""
        try:
            result = self._generate(generation)
            return ("cancelled", None) if result is None else ("done", result)
        except Exception as err:  # noqa: BLE001 - the server must outlive any one request
            return error_event(err, generation.job)

    # ---- the model: every call into LongVA is in this method --------------------------------

    def _generate(self, generation: Generation) -> tuple[str, int, int, int] | None:
        """Answer through the engine; streamed text is emitted as it comes. Returns (text, prompt
        tokens, generated tokens, cached prompt tokens), or None once the request is cancelled."""
        from longva_cli.engine.answering import Built, MediaError, Request, answer
        from longva_cli.engine.encoder import MediaSpec
        from longva_cli.engine.objectives import Generate, Notice, SamplingSettings, Token, drive

        job, longva = generation.job, self.longva
        sampling = SamplingSettings.defaults(longva.generation_config, max_new_tokens=job.max_tokens, temperature=job.temperature, top_p=job.top_p, top_k=job.top_k)
        sampling.seed = job.seed
        media = [MediaSpec(item.path, job.frames, job.fps) for item in job.media]
        request = Request(job.turns, Generate(sampling), media, job.system)

        def on_event(event) -> None:
            if isinstance(event, Built):
                job.cleanup()  # encoded: the files from data: URLs and the held files are no longer needed
                check_prompt_length(event.tokens, self.budget.max_tokens, job)
                generation.emit("ready")
            elif isinstance(event, Notice):
                log.warning(event.message)
            elif job.stream and isinstance(event, Token) and event.text:
                generation.emit("text", event.text)

        def runner(sequence):
            return self.runners.acquire(sequence, scope=job.tenant)

        cache = TenantCache(self.visual_cache, job.tenant)
        try:
            answered = drive(
                answer(longva, request, runner, cache, visual_tokens_on_host=self.visual_tokens_on_host), on_event,
                stop=generation.cancelled.is_set,
            )
        except MediaError as err:
            with media_errors(job.media[err.index]):
                raise err  # the 400 naming that item's field
        if answered is None:
            return None
        generated = answered.result
        return generated.text, answered.prompt_tokens, len(generated.token_ids), generated.reused_tokens
