"""OpenAI chat-completions requests in, LongVA chat turns and media files out; responses back.

A request is checked completely before it reaches the model queue: every problem becomes an
`APIError` whose JSON is OpenAI's `{"error": {"message", "type", "param", "code"}}`, with
`param` naming the field (`messages[0].content[1].video_url.url`).

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
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from longva_cli.model.prompt import DEFAULT_SYSTEM, IMAGE_PLACEHOLDER, Turn

DEFAULT_FRAMES = 32  # `longva ask`'s default
MEDIA_PART_TYPES = {"image_url": "image", "video_url": "video"}
# Sniffed by content after decoding, like `longva ask` does with files.
DATA_URL_TYPES = ("image/", "video/", "application/octet-stream")


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


class VideoOptions(BaseModel):
    """Top-level `video` field (the OpenAI client sends it with `extra_body={"video": {...}}`)."""

    model_config = ConfigDict(extra="forbid")
    frames: int | None = Field(None, ge=1, description="frames sampled uniformly (default 32)")
    fps: float | None = Field(None, gt=0, description="frames per second; `frames` then caps the count")


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
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=1, description="one choice per request")
    stop: str | list[str] | None = None
    tools: list[Any] | None = None
    video: VideoOptions | None = None


@dataclass
class RequestLimits:
    """What one request may ask for; set by `longva serve` flags."""

    media_roots: tuple[Path, ...] = ()  # resolved folders file:// URLs may point into
    max_frames: int = 256
    max_tokens: int = 1024
    max_media: int = 8


@dataclass
class MediaItem:
    path: Path
    kind: str  # "image" or "video": what the part claimed; the file's content decides
    temporary: bool  # written from a data: URL; deleted when the request ends
    param: str = ""  # where it was in the request, for error messages

    @property
    def label(self) -> str:
        """How errors name it: the client never saw the temporary file's name."""
        return f"the data: URL at {self.param}" if self.temporary else str(self.path)


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

    def cleanup(self) -> None:
        """Delete the files written from data: URLs (idempotent)."""
        for item in self.media:
            if item.temporary:
                item.path.unlink(missing_ok=True)


def validation_error(err: ValidationError) -> APIError:
    """Pydantic's first complaint as one OpenAI-style 400 naming the field."""
    first = err.errors()[0]
    param = ""
    for part in first["loc"]:
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else str(part))
    message = first["msg"]
    if first["type"] == "missing":
        message = "this field is required"
    elif first["type"] == "extra_forbidden":
        message = "unknown field"
    return APIError(400, f"{param}: {message}." if param else f"{message}.", param=param or None)


def parse_chat_body(raw: bytes, limits: RequestLimits, served_names: set[str], default_model: str, workdir: Path) -> ChatJob:
    """`parse_chat_request` of the raw request body."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON ({err}).") from None
    return parse_chat_request(body, limits, served_names, default_model, workdir)


def parse_chat_request(body: Any, limits: RequestLimits, served_names: set[str], default_model: str, workdir: Path) -> ChatJob:
    """Check a decoded JSON body completely; data: URLs are written under `workdir`."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object.")
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
        frames = video.frames or min(DEFAULT_FRAMES, limits.max_frames)

    system, turns, media = None, [], []
    try:
        for index, message in enumerate(request.messages):
            where = f"messages[{index}]"
            role = message.role
            if role in ("system", "developer"):
                text = _text_only(message.content, where)
                system = text if system is None else f"{system}\n\n{text}"
            elif role == "assistant":
                turns.append(Turn("assistant", _text_only(message.content, where)))
            elif role == "user":
                turns.append(Turn("user", _user_text(message.content, where, limits, workdir, media)))
            else:
                raise APIError(400, f"{where}.role {role!r} is not supported; use system, user or assistant.", param=f"{where}.role")
        if not turns or turns[-1].role != "user":
            raise APIError(400, "the last message must come from the user.", param="messages")
    except BaseException:
        for item in media:
            if item.temporary:
                item.path.unlink(missing_ok=True)
        raise
    return ChatJob(
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
    )


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
    """A data: URL (written to a temporary file) or a file:// URL inside a media root."""
    if url.startswith("data:"):
        return MediaItem(_write_data_url(url, param, workdir), kind, temporary=True, param=param)
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return MediaItem(_local_file(parsed, param, limits.media_roots), kind, temporary=False, param=param)
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
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "the data: URL is not valid base64.", param=param) from None
    if not data:
        raise APIError(400, "the data: URL holds no data.", param=param)
    suffix = mimetypes.guess_extension(mime) or ".bin"
    handle, name = tempfile.mkstemp(suffix=suffix, dir=workdir)
    with os.fdopen(handle, "wb") as out:
        out.write(data)
    return Path(name)


def _local_file(parsed, param: str, roots: tuple[Path, ...]) -> Path:
    if not roots:
        raise APIError(
            403, "file:// URLs are turned off on this server; start it with --media-root DIR to allow files under DIR, or send a data: URL.",
            type="permission_error", param=param, code="media_root",
        )
    if parsed.netloc not in ("", "localhost"):
        raise APIError(400, "file:// URLs must name a local path (file:///path).", param=param)
    raw = Path(unquote(parsed.path))
    if not raw.is_absolute():
        raise APIError(400, "file:// URLs must hold an absolute path.", param=param)
    # resolve() follows symlinks and removes '..', so the check below sees the real target.
    path = raw.resolve()
    if not any(path.is_relative_to(root) for root in roots):
        raise APIError(403, f"{raw} is outside the server's media roots.", type="permission_error", param=param, code="media_root")
    if not path.is_file():
        raise APIError(400, f"{raw} does not exist or is not a file.", param=param)
    return path


# ---- responses -----------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(generated: int, max_tokens: int) -> str:
    """`length` when the budget ran out before the end-of-turn token, else `stop`."""
    return "length" if generated >= max_tokens else "stop"


def completion(job: ChatJob, text: str, reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "id": job.id,
        "object": "chat.completion",
        "created": job.created,
        "model": job.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(job: ChatJob, delta: dict, reason: str | None = None) -> dict:
    return {
        "id": job.id,
        "object": "chat.completion.chunk",
        "created": job.created,
        "model": job.model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}],
    }


def usage_chunk(job: ChatJob, prompt_tokens: int, completion_tokens: int) -> dict:
    """The extra last chunk of `stream_options.include_usage`: no choices, only usage."""
    return {
        "id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": job.model,
        "choices": [], "usage": usage(prompt_tokens, completion_tokens),
    }


def models_list(names: list[str], created: int, root: str) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "longva", "root": root} for name in names]}
