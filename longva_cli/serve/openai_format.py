"""OpenAI chat-completions requests in, LongVA chat turns and media files out; responses back.

A request is checked completely before it reaches the model queue: every problem becomes an
`APIError` whose JSON is OpenAI's `{"error": {"message", "type", "param", "code"}}`, with
`param` naming the field (`messages[0].content[1].video_url.url`).

A `file://` URL is opened here, once, and the descriptor is held until the request ends: the
decoders read `/proc/self/fd/N`, the very file that was checked, whatever happens to its path
while the request waits in the queue.

Media parts become `<image>` placeholders in their own turn, in order, text parts around them
joined by newlines, so `[video, "What happens?"]` renders exactly as `longva ask` does:
`<image>\\nWhat happens?`.
"""

from __future__ import annotations

import base64
import binascii
import json
import mimetypes
import os
import re
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from longva_cli.checks import INT64_MAX, INT64_MIN, check_number, checked_text
from longva_cli.defaults import FRAMES
from longva_cli.errors import LongVAError
from longva_cli.model.prompt import DEFAULT_SYSTEM, IMAGE_PLACEHOLDER, Turn
from longva_cli.serve.settings import RequestLimits

MEDIA_PART_TYPES = {"image_url": "image", "video_url": "video"}
# Sniffed by content after decoding, like `longva ask` does with files.
DATA_URL_TYPES = ("image/", "video/", "application/octet-stream")
HELD_FILES = Path("/proc/self/fd")  # reopening /proc/self/fd/N reads the held file, not whatever its path names now


class APIError(Exception):
    """An error answered as OpenAI does: an HTTP status and `{"error": {...}}`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---- request schema ------------------------------------------------------------------------


def number(param: str, **bounds) -> BeforeValidator:
    """A numeric field checked as every number in longva is (`checks.check_number`: finite, of
    the right type, in range; null allowed), before pydantic sees it; a 400 naming `param`."""

    def check(value):
        try:
            return check_number(param, value, nullable=True, **bounds)
        except LongVAError as err:
            raise APIError(400, str(err), param=param) from None

    return BeforeValidator(check)


# Counts are bounded to 64 bits so that nothing out of range reaches torch (a seed of 10**30 overflows it).
COUNT = {"integer": True, "at_least": 1, "at_most": INT64_MAX}


class VideoOptions(BaseModel):
    """Top-level `video` field (the OpenAI client sends it with `extra_body={"video": {...}}`)."""

    model_config = ConfigDict(extra="forbid")
    frames: Annotated[int | None, number("video.frames", **COUNT)] = None  # sampled uniformly (default 32)
    # Frames per second; `frames` then caps the count. Below 0.001 the step between frames
    # (video fps / fps) overflows; nothing useful lies there.
    fps: Annotated[float | None, number("video.fps", at_least=0.001)] = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class Message(BaseModel):
    role: str
    content: str | list[Any] | None = None
    name: str | None = None


class ChatRequest(BaseModel):
    """The fields of OpenAI's chat-completions body that LongVA honours; others are ignored."""

    model: str | None = None
    messages: list[Message] = Field(..., min_length=1)
    max_tokens: Annotated[int | None, number("max_tokens", **COUNT)] = None
    max_completion_tokens: Annotated[int | None, number("max_completion_tokens", **COUNT)] = None
    # A temperature too small to sample at decodes greedily (`SamplingSettings.greedy`), as 0 does.
    temperature: Annotated[float | None, number("temperature", at_least=0, at_most=2)] = None
    top_p: Annotated[float | None, number("top_p", above=0, at_most=1)] = None
    top_k: Annotated[int | None, number("top_k", **COUNT)] = None
    seed: Annotated[int | None, number("seed", integer=True, at_least=INT64_MIN, at_most=INT64_MAX)] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int | None, number("n", integer=True, at_least=1, at_most=1)] = None  # one choice per request
    stop: str | list[str] | None = None
    tools: list[Any] | None = None
    video: VideoOptions | None = None


@dataclass
class MediaItem:
    path: Path  # what the decoders open: a temporary file, or /proc/self/fd/N of a held file:// file
    kind: str  # "image" or "video": what the part claimed; the file's content decides
    temporary: bool  # written from a data: URL; deleted when the request ends
    param: str = ""  # where it was in the request, for error messages
    source: str = ""  # the path a file:// URL named
    fd: int | None = None  # the file:// file, held open from its check until the request ends

    @property
    def label(self) -> str:
        """How errors name it: the client never saw the temporary file's or descriptor's name."""
        return f"the data: URL at {self.param}" if self.temporary else self.source

    def release(self) -> None:
        """Delete the temporary file, close the held descriptor (once)."""
        if self.temporary:
            self.path.unlink(missing_ok=True)
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


@dataclass
class ChatJob:
    """A checked request: what the worker thread needs to answer it."""

    id: str
    model: str
    system: str | None
    turns: list[Turn]
    media: list[MediaItem]
    frames: int | None
    fps: float | None
    max_tokens: int
    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int | None
    stream: bool
    include_usage: bool
    created: int = field(default_factory=lambda: int(time.time()))
    system_param: str | None = None  # where the system prompt came from, for errors
    turn_params: list[str] = field(default_factory=list)  # `messages[i].content` of each turn
    tenant: str = ""  # whose request (see `app.tenant_of`): follow-up reuse stays within a tenant
    _release_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def cleanup(self) -> None:
        """Delete the files written from data: URLs and close held files (idempotent; the
        worker and the request side may both call it)."""
        with self._release_lock:
            release(self.media)


def release(media: list[MediaItem]) -> None:
    for item in media:
        item.release()


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


def validation_error(err: ValidationError) -> APIError:
    """Pydantic's first complaint as one OpenAI-style 400 naming the field."""
    first = err.errors(include_url=False, include_context=False, include_input=False)[0]
    param = ""
    for part in first["loc"]:
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else str(part))
    message = first["msg"]
    if first["type"] == "missing":
        message = "this field is required"
    elif first["type"] == "extra_forbidden":
        message = "unknown field"
    return APIError(400, f"{param}: {message}." if param else f"{message}.", param=param or None)


def _refuse_constant(name: str):
    raise APIError(400, f"the request body contains {name}, which is not JSON; send finite numbers.")


def decode_json(raw: bytes) -> Any:
    """The request body as Python values; every way it can fail is a 400."""
    try:
        return json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        param = nesting_path(raw)
        where = param or "the request body"
        raise APIError(400, f"{where} is nested too deeply (JSON deeper than about {NESTING_HINT} levels).", param=param) from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, or an integer of more than 4300 digits
        reason = str(err).partition(";")[0]  # Python's advice after the ';' is for the server, not the client
        raise APIError(400, f"the request body is not valid JSON ({reason}).") from None


NESTING_HINT = 900  # json.loads gives up near Python's recursion limit (1000)
_JSON_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"(\s*:)?|[\[\]{},]')


def nesting_path(raw: bytes, depth: int = 6, max_tokens: int = 1_000_000) -> str | None:
    """Where a too-deeply nested body goes deep: the path of its first container `depth` levels
    down (`messages[0].content[0][0]`), None if the top level is not an object or the body is
    too long to look through."""
    stack: list[list] = []  # one [kind, key or index] per open container
    for count, match in enumerate(_JSON_TOKEN.finditer(raw)):
        if count > max_tokens:
            return None
        token = match.group()
        if token[:1] == b'"':
            if match.group(1) and stack and stack[-1][0] == "{":
                stack[-1][1] = json.loads(token[: token.rindex(b'"') + 1])[:64]
        elif token in (b"[", b"{"):
            if len(stack) == depth:
                if stack[0][0] != "{":
                    return None
                path = ""
                for kind, key in stack:
                    path += f"[{key}]" if kind == "[" else (f".{key}" if path else str(key))
                return path
            stack.append([token.decode(), 0 if token == b"[" else None])
        elif token in (b"]", b"}"):
            if stack:
                stack.pop()
        elif stack and stack[-1][0] == "[":  # a comma between array items
            stack[-1][1] += 1
    return None


def check_strings(body: Any) -> None:
    """Refuse any string of the decoded body, keys included, that is not Unicode text: JSON may
    escape lone UTF-16 surrogates ("\\ud800"), which no tokenizer, file name or UTF-8 response
    can hold. A 400 naming where it was, before any work."""
    pending = [(body, "")]
    while pending:  # a loop, not recursion: the body may nest about 900 levels
        value, param = pending.pop()
        try:
            if isinstance(value, str):
                checked_text(value, param or "the request body")
            elif isinstance(value, dict):
                for key, item in value.items():
                    checked_text(key, f"a key of {param or 'the request body'}")
                    pending.append((item, f"{param}.{key}" if param else key))
            elif isinstance(value, list):
                pending += [(item, f"{param}[{index}]") for index, item in enumerate(value)]
        except LongVAError as err:
            raise APIError(400, str(err), param=param or None) from None


def parse_chat_body(raw: bytes, limits: RequestLimits, served_names: set[str], default_model: str, workdir: Path, budget=None) -> ChatJob:
    """`parse_chat_request` of the raw request body."""
    return parse_chat_request(decode_json(raw), limits, served_names, default_model, workdir, budget)


def parse_chat_request(
    body: Any, limits: RequestLimits, served_names: set[str], default_model: str, workdir: Path, budget=None
) -> ChatJob:
    """Check a decoded JSON body completely; data: URLs are written under `workdir`, file://
    files are opened and held. With a `serve.budget.PromptBudget`, a prompt longer than it
    allows is refused before any work."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object.")
    check_strings(body)
    try:
        request = ChatRequest.model_validate(body)
    except ValidationError as err:
        raise validation_error(err) from None
    if request.model is not None and request.model not in served_names:
        raise APIError(
            404, f"the model {request.model!r} does not exist on this server; use {default_model!r} (see GET /v1/models).",
            param="model", code="model_not_found",
        )
    if request.stop:
        raise APIError(400, "stop sequences are not supported; the model stops at the end of its turn.", param="stop")
    if request.tools:
        raise APIError(400, "tools are not supported by LongVA.", param="tools")
    max_tokens = request.max_completion_tokens or request.max_tokens or limits.max_tokens
    if max_tokens > limits.max_tokens:
        name = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        raise APIError(400, f"{name} is {max_tokens}, above this server's limit of {limits.max_tokens}.", param=name)
    video = request.video or VideoOptions()
    if video.frames is not None and video.frames > limits.max_frames:
        raise APIError(400, f"video.frames is {video.frames}, above this server's limit of {limits.max_frames}.", param="video.frames")
    if video.fps is not None:
        frames = video.frames or limits.max_frames  # a cap on what the frame rate picks
    else:
        frames = video.frames or min(FRAMES, limits.max_frames)

    system, system_param, turns, turn_params, media = None, None, [], [], []
    try:
        for index, message in enumerate(request.messages):
            where = f"messages[{index}]"
            role = message.role
            if role in ("system", "developer"):
                text = _text_only(message.content, where)
                system = text if system is None else f"{system}\n\n{text}"
                system_param = f"{where}.content" if system_param is None else "messages"
            elif role == "assistant":
                turns.append(Turn("assistant", _text_only(message.content, where)))
                turn_params.append(f"{where}.content")
            elif role == "user":
                turns.append(Turn("user", _user_text(message.content, where, limits, workdir, media)))
                turn_params.append(f"{where}.content")
            else:
                raise APIError(400, f"{where}.role {role!r} is not supported; use system, user or assistant.", param=f"{where}.role")
        if not turns or turns[-1].role != "user":
            raise APIError(400, "the last message must come from the user.", param="messages")
        job = ChatJob(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            model=request.model or default_model,
            system=DEFAULT_SYSTEM if system is None else system,
            turns=turns,
            media=media,
            frames=frames,
            fps=video.fps,
            max_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            seed=request.seed,
            stream=request.stream,
            include_usage=bool(request.stream_options and request.stream_options.include_usage),
            system_param=system_param,
            turn_params=turn_params,
        )
        if budget is not None:
            budget.check(job)
    except BaseException:
        release(media)
        raise
    return job


def _checked_text(text: Any, param: str) -> str:
    if not isinstance(text, str):
        raise APIError(400, f"{param} must be a string.", param=param)
    if IMAGE_PLACEHOLDER in text:
        # A literal placeholder would shift every media item after it.
        raise APIError(400, f"{param} contains {IMAGE_PLACEHOLDER}; send media as image_url or video_url parts.", param=param)
    return text


def _parts(content: Any, where: str) -> list[tuple[str, dict]]:
    """(param, part) pairs of a message's content; a plain string is one text part."""
    if content is None:
        raise APIError(400, f"{where}.content is required.", param=f"{where}.content")
    if isinstance(content, str):
        return [(f"{where}.content", {"type": "text", "text": content})]
    if not content:
        raise APIError(400, f"{where}.content is an empty list.", param=f"{where}.content")
    parts = []
    for i, part in enumerate(content):
        param = f"{where}.content[{i}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise APIError(400, f"{param} must be an object with a 'type'.", param=param)
        parts.append((param, part))
    return parts


def _part_text(param: str, part: dict) -> str:
    # A string content is its own text; a list part holds it under "text".
    return _checked_text(part.get("text"), param if param.endswith(".content") else f"{param}.text")


def _text_only(content: Any, where: str) -> str:
    texts = []
    for param, part in _parts(content, where):
        if part["type"] != "text":
            raise APIError(400, f"{param}: only text parts are allowed here, got {part['type']!r}.", param=f"{param}.type")
        texts.append(_part_text(param, part))
    return "\n".join(texts)


def _user_text(content: Any, where: str, limits: RequestLimits, workdir: Path, media: list[MediaItem]) -> str:
    """The turn's text with one placeholder per media part, in order; `media` collects the files."""
    pieces = []
    for param, part in _parts(content, where):
        kind = part["type"]
        if kind == "text":
            pieces.append(_part_text(param, part))
        elif kind in MEDIA_PART_TYPES:
            if len(media) >= limits.max_media:
                raise APIError(400, f"too many media items: this server takes at most {limits.max_media} per request.", param=param)
            value = part.get(kind)
            url = value.get("url") if isinstance(value, dict) else value
            if not isinstance(url, str) or not url:
                raise APIError(400, f"{param}.{kind}.url is required (a data: URL or a file:// URL).", param=f"{param}.{kind}.url")
            media.append(resolve_media(url, MEDIA_PART_TYPES[kind], f"{param}.{kind}.url", limits, workdir))
            pieces.append(IMAGE_PLACEHOLDER)
        else:
            raise APIError(400, f"{param}.type {kind!r} is not supported; use text, image_url or video_url.", param=f"{param}.type")
    return "\n".join(pieces)


def resolve_media(url: str, kind: str, param: str, limits: RequestLimits, workdir: Path) -> MediaItem:
    """A data: URL (written to a temporary file) or a file:// URL inside a media root (held open)."""
    if url.startswith("data:"):
        return MediaItem(_write_data_url(url, param, workdir), kind, temporary=True, param=param)
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return _open_local_file(parsed, kind, param, limits.media_roots)
    if parsed.scheme in ("http", "https"):
        raise APIError(400, "remote URLs are not fetched; send the media as a data: URL or a file:// URL under the server's --media-root.", param=param)
    raise APIError(400, "the media URL must be a data: URL (base64) or a file:// URL.", param=param)


def _write_data_url(url: str, param: str, workdir: Path) -> Path:
    header, comma, payload = url[len("data:") :].partition(",")
    if not comma:
        raise APIError(400, "the data: URL has no ',' before its data.", param=param)
    fields = [f.strip().lower() for f in header.split(";")]
    mime = fields[0]
    if not mime.startswith(DATA_URL_TYPES):
        raise APIError(400, f"the data: URL has type {mime or 'text/plain'!r}; send an image/* or video/* data URL.", param=param)
    if "base64" not in fields[1:]:
        raise APIError(400, "the data: URL must be base64-encoded (data:<type>;base64,<data>).", param=param)
    if _WHITESPACE.search(payload):  # line-wrapped base64; the copy is made only then
        payload = "".join(payload.split())
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "the data: URL is not valid base64.", param=param) from None
    del payload
    if not data:
        raise APIError(400, "the data: URL holds no data.", param=param)
    suffix = mimetypes.guess_extension(mime) or ".bin"
    handle, name = tempfile.mkstemp(suffix=suffix, dir=workdir)
    with os.fdopen(handle, "wb") as out:
        out.write(data)
    return Path(name)


_WHITESPACE = re.compile(r"\s")


def _inside(path: str, roots: tuple[Path, ...]) -> bool:
    return any(Path(path).is_relative_to(root) for root in roots)


def _open_local_file(parsed, kind: str, param: str, roots: tuple[Path, ...]) -> MediaItem:
    """Open a file:// URL's file inside a media root and hold it: the check and the read see one file.

    The path is resolved (symlinks that stay inside a root are fine), opened without following a
    last link, and the kernel's own name for what was opened is checked again: a folder swapped
    for a symlink between the two steps is caught, and one swapped later no longer matters.
    """
    if not roots:
        raise APIError(
            403, "file:// URLs are turned off on this server; start it with --media-root DIR to allow files under DIR, or send a data: URL.",
            type="permission_error", param=param, code="media_root",
        )
    if parsed.netloc not in ("", "localhost"):
        raise APIError(400, "file:// URLs must name a local path (file:///path).", param=param)
    named = unquote(parsed.path)
    if "\x00" in named:
        raise APIError(400, "the file:// URL contains a NUL byte (%00), which no file name can hold.", param=param)
    if not named.startswith("/"):
        raise APIError(400, "file:// URLs must hold an absolute path.", param=param)
    outside = APIError(403, f"{named} is outside the server's media roots.", type="permission_error", param=param, code="media_root")
    resolved = os.path.realpath(named)
    if not _inside(resolved, roots):
        raise outside
    try:
        # O_NONBLOCK: opening a FIFO must not hang the request; regular files read as usual.
        fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise APIError(400, f"{named} does not exist or is not a file.", param=param) from None
    except OSError as err:
        raise APIError(400, f"{named} cannot be opened ({err.strerror}).", param=param) from None
    try:
        if not _inside(os.readlink(HELD_FILES / str(fd)), roots):
            raise outside  # a folder on the way became a link out of the root after it was resolved
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise APIError(400, f"{named} does not exist or is not a file.", param=param)
    except BaseException:
        os.close(fd)
        raise
    return MediaItem(HELD_FILES / str(fd), kind, temporary=False, param=param, source=named, fd=fd)


# ---- responses -----------------------------------------------------------------------------


# `cached_tokens` is reported in whole blocks of this many tokens, as vLLM counts its KV blocks:
# an exact count would tell a client, one guess per request, whether the next token of a prompt
# it shares a prefix with matches (reuse never crosses tenants; this is for clients of one key).
CACHED_TOKENS_BLOCK = 16


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; `cached_tokens`: prompt tokens whose KV cache an earlier request of
    the same tenant left, rounded down to whole blocks of CACHED_TOKENS_BLOCK."""
    return {
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens // CACHED_TOKENS_BLOCK * CACHED_TOKENS_BLOCK},
    }


def finish_reason(generated: int, max_tokens: int) -> str:
    """`length` when the budget ran out before the end-of-turn token, else `stop`."""
    return "length" if generated >= max_tokens else "stop"


def completion(job: ChatJob, text: str, reason: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {
        "id": job.id,
        "object": "chat.completion",
        "created": job.created,
        "model": job.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": reason}],
        "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
    }


def chunk(job: ChatJob, delta: dict, reason: str | None = None) -> dict:
    return {
        "id": job.id,
        "object": "chat.completion.chunk",
        "created": job.created,
        "model": job.model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}],
    }


def usage_chunk(job: ChatJob, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """The extra last chunk of `stream_options.include_usage`: no choices, only usage."""
    return {
        "id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": job.model,
        "choices": [], "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
    }


def models_list(names: list[str], created: int, root: str) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "longva", "root": root} for name in names]}
