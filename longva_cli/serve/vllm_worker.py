"""The vLLM worker: LongVA on vLLM's async engine (`AsyncLLM`), concurrent requests batched.

Imported only by `longva serve --engine vllm` (this module imports vLLM). The HTTP layer is the
same as the native engine's; what changes is who runs a checked request:

    media   decoded here, by our code: `vllm.video.load_video` (the frames `longva ask` takes),
            `media.open_image` for images; on a thread, off the event loop
    prompt  `chat_prompt` of the conversation, each media item's placeholder `<image>` or
            `<video>` (the plugin's processor expands it to 144 tokens a frame or crop)
    length  counted exactly, as the native engine counts it, and refused over the limit
    engine  `AsyncLLM.add_request` with the sampling spelled out (temperature, top-k, top-p,
            repetition penalty, seed, max tokens, the native engine's stop ids), so greedy
            answers are the native engine's; vLLM batches the requests it holds (continuous
            batching, paged KV cache, prefix caching for follow-ups about the same video,
            salted by tenant so that reuse never crosses API keys)

Up to vLLM's `max_num_seqs` requests run at once; more wait in our queue (`--max-queue`,
`--queue-timeout`). A request whose client leaves, or that the shutdown cancels, is aborted in
vLLM at once.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import os
import re
import shlex
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import GracefulHTTPError, VLLMClientError
from vllm.sampling_params import RequestOutputKind
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError

from longva_cli.console import stderr
from longva_cli.errors import LongVAError
from longva_cli.serve.openai_format import APIError, media_errors
from longva_cli.serve.worker import Admission, Generation, check_prompt_length, error_event

if TYPE_CHECKING:
    from longva_cli.serve.settings import ServeSettings, VLLMSettings

# Engine arguments `longva serve` sets from its own flags; --vllm-args may not set them again.
OWN_ARGUMENTS = {
    "model": "--model", "tokenizer": "--model", "revision": "--revision", "dtype": "--dtype",
    "tensor_parallel_size": "--tensor-parallel", "max_model_len": "--max-model-len",
    "gpu_memory_utilization": "--gpu-memory-utilization", "enable_prefix_caching": "(always on)",
    "limit_mm_per_prompt": "--max-media",
}
PREPARING_AT_ONCE = 4  # requests whose media are being decoded and preprocessed at one time
# On a CPU, the share of the memory free at start that vLLM may reserve when nobody said how much
# (vLLM's own default, 0.92 of all memory, refuses to start once others use more than 8%).
CPU_SHARE_OF_FREE_MEMORY = 0.8
# An exception's last line, possibly behind the "(EngineCore_DP0 pid=N)" prefix vLLM gives its
# processes' output: "ValueError: Available memory on node 0 ...".
EXCEPTION_LINE = re.compile(r"(?:^|\s)((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception): \S.*)$")


def engine_args(folder: Path, settings: "ServeSettings", options: "VLLMSettings") -> AsyncEngineArgs:
    """vLLM's engine arguments: ours, plus what --vllm-args says in vLLM's own spelling."""
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(prog="--vllm-args", exit_on_error=False))
    try:
        parsed, unknown = parser.parse_known_args(["--model", str(folder), *shlex.split(options.extra_args)])
    except Exception as err:  # noqa: BLE001 - argparse's ArgumentError, shlex's ValueError
        raise LongVAError(f"--vllm-args {options.extra_args!r}: {err}.") from None
    if unknown:
        raise LongVAError(f"--vllm-args: {' '.join(unknown)} is not an argument of vLLM's engine (see `vllm serve --help`).")
    defaults = parser.parse_args(["--model", str(folder)])
    for name, flag in OWN_ARGUMENTS.items():
        if getattr(parsed, name, None) != getattr(defaults, name, None):
            raise LongVAError(f"--vllm-args sets {name.replace('_', '-')}; `longva serve` sets it from {flag}.")
    ours = {
        "tokenizer": str(folder), "dtype": options.dtype, "tensor_parallel_size": options.tensor_parallel,
        "enable_prefix_caching": True,  # follow-ups about the same video reuse its KV blocks
        "limit_mm_per_prompt": {"image": settings.limits.max_media, "video": settings.limits.max_media},
    }
    if options.max_model_len is not None:
        ours["max_model_len"] = options.max_model_len
    if options.gpu_memory_utilization is not None:
        ours["gpu_memory_utilization"] = options.gpu_memory_utilization
    elif on_cpu() and parsed.kv_cache_memory_bytes is None and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        import psutil

        memory = psutil.virtual_memory()
        ours["gpu_memory_utilization"] = cpu_memory_utilization(memory.available, memory.total)
    vars(parsed).update(ours)
    return AsyncEngineArgs.from_cli_args(parsed)


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def cpu_memory_utilization(available: int, total: int) -> float:
    """vLLM's CPU backend reads --gpu-memory-utilization as the share of ALL the machine's memory
    it reserves (weights, activations, KV cache), and refuses to start when that much is not
    free: the default is CPU_SHARE_OF_FREE_MEMORY of what is free now, as a share of the total."""
    return round(CPU_SHARE_OF_FREE_MEMORY * available / total, 3)


def allow_long_context(config: dict, options: "VLLMSettings") -> str | None:
    """vLLM refuses a --max-model-len beyond the checkpoint's max_position_embeddings unless
    VLLM_ALLOW_LONG_MAX_MODEL_LEN is set; LongVA reads past it (V-NIAH: 3000 frames, 432K
    tokens, on a 224K model), so a length the user asks for is allowed: the warning to show."""
    trained = config.get("max_position_embeddings")
    if options.max_model_len is None or trained is None or options.max_model_len <= trained:
        return None
    os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"  # read here and by the engine processes vLLM starts
    return (f"--max-model-len {options.max_model_len:,} is beyond the {trained:,} positions the checkpoint was trained on "
            "(max_position_embeddings): answers past them rest on RoPE extrapolation (see README, Serving at scale).")


@contextmanager
def exceptions_reported() -> Iterator[list[str]]:
    """The exception lines ("ValueError: ...") written to stdout and stderr while inside, by this
    process and the processes it starts, oldest first; all output passes on to where it went.

    vLLM reports an engine that failed to start as "Engine core initialization failed. See root
    cause above.": the cause is only in the traceback its worker process logged. The pipes stay in
    those processes' hands after the block; their readers keep passing the output on.
    """
    found: list[str] = []
    readers = []
    for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
        stream.flush()
        reader, writer = os.pipe()
        real = os.dup(fd)
        os.dup2(writer, fd)
        os.close(writer)
        thread = threading.Thread(target=_pass_on, args=(reader, real, found), name=f"output-copy-{fd}", daemon=True)
        thread.start()
        readers.append((stream, fd, real, thread))
    failed = True
    try:
        yield found
        failed = False
    finally:
        for stream, fd, real, thread in readers:
            stream.flush()
            os.dup2(real, fd)
        if failed:  # vLLM's processes have exited: read what they wrote last
            for *_, thread in readers:
                thread.join(timeout=5)


def _pass_on(reader: int, real: int, found: list[str]) -> None:
    """Copy the pipe `reader` to the file descriptor `real`, noting exception lines in `found`."""
    pending = b""
    while chunk := os.read(reader, 65536):
        os.write(real, chunk)
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            exception = EXCEPTION_LINE.search(line.decode(errors="replace").strip())
            if exception and len(found) < 100:
                found.append(exception[1])
    os.close(reader)


def root_cause(exceptions: list[str]) -> str | None:
    """The first exception that is not a pointer to another ("... See root cause above.", "See
    stack trace for root cause."): the others followed from it."""
    return next((line for line in exceptions if "root cause" not in line), None)


async def start(model: str, settings: "ServeSettings", options: "VLLMSettings", revision: str | None = None) -> "VLLMWorker":
    """Start vLLM's engine on `model` (a folder, hub id or short name) in this event loop."""
    from longva_cli.hub import locate_model
    from longva_cli.model.checkpoint import load_tokenizer
    from longva_cli.model.config import read_config, read_generation_config

    folder = locate_model(model, revision=revision, kind="longva")
    if read_config(folder).get("model_type") != "llava_qwen":
        raise LongVAError(f"{model} is not a LongVA checkpoint (model_type llava_qwen); `longva serve --engine vllm` serves LongVA only.")
    warning = allow_long_context(read_config(folder), options)
    if warning:
        stderr.print(f"[yellow]warning:[/yellow] {warning}", soft_wrap=True)
    args = engine_args(folder, settings, options)
    try:
        with exceptions_reported() as exceptions:
            engine = AsyncLLM.from_engine_args(args)
    except Exception as err:  # noqa: BLE001 - vLLM's reasons are many; its log above has the details
        # One line: pydantic's reasons come on several, with a documentation link last.
        lines = [line.strip() for line in str(err).splitlines() if line.strip() and not line.strip().startswith("For further information")]
        reason = " ".join(lines) or type(err).__name__
        if "root cause" in reason:  # vLLM's pointer to a traceback in its processes' output
            reason = root_cause(exceptions) or reason
        raise LongVAError(f"vLLM could not start its engine for {model}: {reason}") from None
    return VLLMWorker(engine, load_tokenizer(folder), read_generation_config(folder), model, settings)


class VLLMWorker(Admission):
    """Requests handed to vLLM's `AsyncLLM`, each as an asyncio task on the server's loop."""

    engine = "vllm"

    def __init__(self, engine: AsyncLLM, tokenizer, generation_config: dict, name: str, settings: "ServeSettings") -> None:
        from longva_cli.model.longva import stop_ids
        from longva_cli.serve.budget import PromptBudget
        from longva_cli.vllm.config import vision_of

        super().__init__(settings.max_queue)
        self.vllm = engine
        self.model_root = name
        self.tokenizer = tokenizer
        self.generation_config = generation_config
        config = engine.model_config.hf_config
        vision = vision_of(config)
        # The engine holds at most max_model_len positions (the checkpoint's max_position_embeddings
        # unless --max-model-len says otherwise), the answer's first token included.
        engine_positions = engine.model_config.max_model_len - 1
        limit = min(settings.limits.max_prompt_tokens or engine_positions, engine_positions)
        self.budget = PromptBudget(
            max_tokens=limit, tokenizer=copy.deepcopy(tokenizer), tokens_per_image=vision.tokens_per_image,
            crop=vision.processing.crop, pinpoints=tuple(tuple(p) for p in vision.mm.image_grid_pinpoints),
        )
        # Where the native engine stops (`LongVA.stop_ids`): the end of the turn and the checkpoint's eos ids.
        self.stop_ids = sorted(stop_ids(tokenizer, generation_config))
        self.max_running = engine.vllm_config.scheduler_config.max_num_seqs
        self._pending: collections.deque[Generation] = collections.deque()
        self._loop = asyncio.get_running_loop()
        self._tokenizer_lock = threading.Lock()  # requests are prepared on several threads
        self._preparing = asyncio.Semaphore(PREPARING_AT_ONCE)

    @property
    def busy(self) -> bool:
        return bool(self._running) or self.vllm.get_num_unfinished_requests() > 0

    def join(self, timeout: float | None = None) -> bool:
        """Stop vLLM's engine processes once the server has stopped. Every request was aborted
        already; vLLM's own grace period lets its processes exit cleanly (`timeout` is for a
        worker thread stuck in a step, which this worker has not)."""
        self.vllm.shutdown()
        return True

    # ---- the queue -------------------------------------------------------------------------

    def _enqueue(self, generation: Generation) -> None:
        self._pending.append(generation)
        self._start_waiting()

    def _closed_hook(self) -> None:
        # `close` may run in a signal handler: the files of the requests that never started are
        # released from the loop, where nothing else can hold their locks at that moment.
        self._loop.call_soon_threadsafe(self._release_pending)

    def _release_pending(self) -> None:
        while self._pending:
            self._pending.popleft().job.cleanup()

    def _start_waiting(self) -> None:
        """Start queued requests while vLLM has room for them (on the event loop)."""
        while self._pending and len(self._running) < self.max_running:
            generation = self._pending.popleft()
            if self._start(generation):
                generation.task = self._loop.create_task(self._serve(generation))

    async def _serve(self, generation: Generation) -> None:
        try:
            final = await self._answer(generation)
        except asyncio.CancelledError:  # the client left or the server stops: vLLM has let go of it
            final = ("cancelled", None)
        self._finish(generation, final)
        self._start_waiting()

    # ---- one request -----------------------------------------------------------------------

    async def _answer(self, generation: Generation) -> tuple[str, Any]:
        """Run the request; its final event (see `NativeWorker._answer`)."""
        job = generation.job
        try:
            # Decoded frames are full size until vLLM's processor has made pixels of them: a few
            # requests at a time take that step, however many vLLM runs.
            async with self._preparing:
                prompt = await asyncio.to_thread(self._prompt, generation)
                if prompt is None:
                    return "cancelled", None
                # vLLM's renderer runs the plugin's processor (pixels, placeholder expansion) off the loop.
                (engine_input,) = await self.vllm.renderer.render_cmpl_async([prompt])
            result = await self._generate(generation, engine_input)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - the server must outlive any one request
            return error_event(client_error(err), job)
        return ("cancelled", None) if result is None else ("done", result)

    def _prompt(self, generation: Generation) -> dict | None:
        """vLLM's prompt: the text with one placeholder per media item, and the decoded media.
        On a thread: decoding a video takes a while. None when the request was cancelled."""
        from longva_cli import media as media_io
        from longva_cli.model.prompt import IMAGE_PLACEHOLDER, chat_prompt, tokenize_segments
        from longva_cli.vllm.processor import VIDEO_PLACEHOLDER
        from longva_cli.vllm.video import load_video

        job = generation.job
        texts = [(job.system or "", job.system_param or "messages"), *((turn.text, param) for turn, param in zip(job.turns, job.turn_params, strict=True))]
        for text, param in texts:
            if VIDEO_PLACEHOLDER in text:  # vLLM's processor would take it for a video's place
                raise APIError(400, f"{param} contains {VIDEO_PLACEHOLDER}; send media as image_url or video_url parts.", param=param)
        placeholders, images, videos, visual_tokens = [], [], [], 0
        for item in job.media:
            if generation.cancelled.is_set():
                return None
            with media_errors(item):
                image = media_io.open_image(media_io.check_file(item.path))
                if image is not None:
                    images.append(image)
                    placeholders.append(IMAGE_PLACEHOLDER)
                    visual_tokens += self.budget.image_crops(image.size) * self.budget.tokens_per_image
                else:
                    frames, _ = load_video(item.path, frames=job.frames, fps=job.fps)
                    videos.append(frames)
                    placeholders.append(VIDEO_PLACEHOLDER)
                    visual_tokens += len(frames) * self.budget.tokens_per_image
        job.cleanup()  # decoded: the files from data: URLs and the held files are no longer needed
        text = chat_prompt(job.turns, job.system)
        with self._tokenizer_lock:
            text_tokens = sum(len(piece) for piece in tokenize_segments(self.tokenizer, text))
        check_prompt_length(text_tokens + visual_tokens, self.budget.max_tokens, job)
        # vLLM holds no more than max_model_len positions: an answer that fills them ends with "length".
        job.max_tokens = min(job.max_tokens, self.vllm.model_config.max_model_len - text_tokens - visual_tokens)
        pieces = text.split(IMAGE_PLACEHOLDER)
        prompt = pieces[0] + "".join(placeholder + piece for placeholder, piece in zip(placeholders, pieces[1:], strict=True))
        media = {name: items for name, items in (("image", images), ("video", videos)) if items}
        engine_input = {"prompt": prompt, "multi_modal_data": media} if media else {"prompt": prompt}
        if job.tenant:  # vLLM's prefix cache reuses KV blocks only between prompts with the same salt
            engine_input["cache_salt"] = job.tenant
        return engine_input

    def sampling(self, job) -> SamplingParams:
        """The request's sampling with the native engine's defaults, as `LongVA.sampling_settings`
        makes them (temperature 0.5, the checkpoint's top-k, else 50, and its repetition penalty)."""
        from longva_cli.engine.objectives import SamplingSettings

        settings = SamplingSettings.defaults(self.generation_config, temperature=job.temperature, top_p=job.top_p, top_k=job.top_k)
        return SamplingParams(
            n=1,
            max_tokens=job.max_tokens,
            temperature=0.0 if settings.greedy else settings.temperature,  # greedy below GREEDY_BELOW, as natively
            top_k=settings.top_k or 0,  # 0: no top-k
            top_p=1.0 if settings.top_p is None else settings.top_p,
            repetition_penalty=settings.repetition_penalty or 1.0,
            seed=job.seed,
            # Stop exactly where the native engine stops: its stop ids, not vLLM's eos rules.
            stop_token_ids=self.stop_ids,
            ignore_eos=True,
            output_kind=RequestOutputKind.DELTA,
            skip_special_tokens=True,
        )

    async def _generate(self, generation: Generation, engine_input) -> tuple[str, int, int, int] | None:
        """Hand the rendered prompt to vLLM and follow its outputs; (text, prompt tokens, generated
        tokens, cached prompt tokens). The request is aborted in vLLM unless it finished."""
        job = generation.job
        if generation.cancelled.is_set():
            return None
        ids: list[int] = []
        streamed: list[str] = []
        prompt_tokens = cached = 0
        finished = False
        try:
            collector = await self.vllm.add_request(job.id, engine_input, self.sampling(job))
            generation.emit("ready")
            while not finished:
                output = collector.get_nowait() or await collector.get()
                finished = output.finished
                if output.prompt_token_ids is not None:
                    prompt_tokens = len(output.prompt_token_ids)
                cached = output.num_cached_tokens or cached
                delta = output.outputs[0]
                ids += delta.token_ids
                if job.stream and delta.text:
                    streamed.append(delta.text)
                    generation.emit("text", delta.text)
        finally:
            if not finished:  # cancelled, or failed: vLLM may hold it (aborting an unknown id is a no-op)
                await asyncio.shield(self.vllm.abort(job.id))
        if ids and ids[-1] in self.stop_ids:
            ids.pop()
        text = await asyncio.to_thread(self._decode, ids)
        # vLLM's stream holds back the bytes of a character the answer ended inside of; the
        # whole answer decodes them (as U+FFFD), so the stream ends as the answer does.
        head = "".join(streamed).lstrip()
        if job.stream and text.startswith(head) and len(text) > len(head):
            generation.emit("text", text[len(head):])
        return text, prompt_tokens, len(ids), cached

    def _decode(self, ids: list[int]) -> str:
        """The answer as the native engine writes it: special tokens removed, stripped."""
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


def client_error(err: Exception) -> Exception:
    """vLLM's exceptions as the client should see them; others pass through."""
    if isinstance(err, GracefulHTTPError):
        return APIError(int(err.http_status), err.message, type="server_error" if int(err.http_status) >= 500 else "invalid_request_error")
    if isinstance(err, VLLMClientError):
        return APIError(400, str(err))
    if isinstance(err, EngineDeadError):
        return APIError(503, "the vLLM engine has stopped; the server must be restarted (its log says why).", type="server_error", code="engine_dead")
    return err
