"""How long a request's prompt will be, counted before any work is queued.

    budget = PromptBudget.of(longva, max_tokens=224_000)
    budget.check(job)  # APIError 400 naming the largest part when the prompt would not fit

Text is tokenized as the worker will tokenize it; media count 144 tokens per video frame and
per image crop. An image's crops follow from its size (read from the file's header, nothing
decoded) and the UniRes grid choice; a video sampled by frame count has exactly that many
frames; one sampled by `fps` is estimated from the container's frame count and rate (the
header read with every frame skipped, and frames too large to decode refused there). The
worker checks the exact length again before prefill.
"""

from __future__ import annotations

import copy
import math
import threading
from dataclasses import dataclass, field
from typing import Any

from longva_cli.model.prompt import IMAGE_PLACEHOLDER, chat_prompt
from longva_cli.serve.openai_format import APIError, ChatJob, MediaItem, media_errors

TEXT_PIECE_CHARS = 1 << 20  # longer texts are tokenized in pieces, stopping once over the limit


@dataclass
class PromptBudget:
    max_tokens: int
    tokenizer: Any
    tokens_per_image: int  # 144: per video frame and per image crop
    crop: int  # 336: the side of an image crop
    pinpoints: tuple[tuple[int, int], ...]
    # Requests are parsed on several threads; the tokenizer is this budget's own copy.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def of(cls, longva, max_tokens: int | None = None) -> "PromptBudget":
        """The budget of a loaded `LongVA`; `max_tokens` None means its max_position_embeddings."""
        return cls(
            max_tokens=max_tokens or longva.model.config.max_position_embeddings,
            tokenizer=copy.deepcopy(longva.tokenizer),
            tokens_per_image=longva.model.tokens_per_image,
            crop=longva.processing.crop,
            pinpoints=tuple(tuple(p) for p in longva.model.mm.image_grid_pinpoints),
        )

    def check(self, job: ChatJob) -> None:
        """Raise a 400 naming the part that weighs most when the prompt would exceed the budget."""
        parts: list[tuple[int, str]] = []  # (tokens, param)
        video_tokens = 0
        for item in job.media:
            size = image_size(item)
            if size is not None:
                parts.append((self.image_crops(size) * self.tokens_per_image, item.param))
            else:
                video_tokens += video_frames(item, job.frames, job.fps) * self.tokens_per_image
        if video_tokens:
            parts.append((video_tokens, "video.frames"))
        visual = sum(tokens for tokens, _ in parts)
        text, complete = self.text_tokens(job, self.max_tokens - visual, parts)
        total = visual + text
        if total <= self.max_tokens:
            return
        tokens, param = max(parts)
        advice = {
            "video.frames": "ask for fewer frames (video.frames, or a lower video.fps)",
            **{item.param: "send a smaller image (fewer 336-pixel crops)" for item in job.media},
        }.get(param, f"shorten {param}")
        counted = "" if complete else "at least "
        raise APIError(
            400,
            f"the prompt would be {counted}{total:,} tokens ({visual:,} of them visual, {self.tokens_per_image} per video frame "
            f"or image crop), above this server's limit of {self.max_tokens:,} (--max-prompt-tokens); {param} holds "
            f"{tokens:,} of them: {advice}.",
            param=param, code="prompt_too_long",
        )

    def image_crops(self, size: tuple[int, int]) -> int:
        from longva_cli.model.processing import select_best_resolution

        width, height = select_best_resolution(size, self.pinpoints)
        return math.ceil(width / self.crop) * math.ceil(height / self.crop)

    def text_tokens(self, job: ChatJob, room: int, parts: list[tuple[int, str]]) -> tuple[int, bool]:
        """(text tokens of the prompt, whether all were counted); adds each turn's count to `parts`.

        Counting stops once over `room`, so a hostile 10 MB message is not tokenized whole.
        """
        pieces = [(chat_prompt([], job.system, add_generation_prompt=False), job.system_param or "messages")]
        pieces += [(chat_prompt([turn], None, add_generation_prompt=False), param) for turn, param in zip(job.turns, job.turn_params, strict=True)]
        pieces.append((chat_prompt([], None, add_generation_prompt=True), "messages"))
        # A byte-level BPE token covers at least one byte: most prompts fit without tokenizing.
        upper = sum(len(rendered.encode()) + rendered.count(IMAGE_PLACEHOLDER) + 1 for rendered, _ in pieces)
        if upper <= room:
            return upper, True
        total = 0
        for index, (rendered, param) in enumerate(pieces):
            count, complete = self._count(rendered, room - total)
            parts.append((count, param))
            total += count
            if total > room:
                return total, complete and index == len(pieces) - 1
        return total, True

    def _count(self, rendered: str, room: int) -> tuple[int, bool]:
        """(tokens of one turn as the worker tokenizes it, split at each placeholder, whether
        all were counted). Pieces longer than TEXT_PIECE_CHARS are cut at a line end."""
        count = 0
        with self._lock:
            for segment in rendered.split(IMAGE_PLACEHOLDER):
                for piece in _pieces(segment, TEXT_PIECE_CHARS):
                    count += len(self.tokenizer(piece, add_special_tokens=False).input_ids)
                    if count > room and piece is not segment:  # a cut piece: the rest is not worth counting
                        return count, False
        return count, True


def _pieces(text: str, size: int):
    """`text` in pieces of at most `size` characters, cut after a newline where there is one."""
    if len(text) <= size:
        yield text
        return
    start = 0
    while start < len(text):
        end = start + size
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        yield text[start:end]
        start = end


def image_size(item: MediaItem) -> tuple[int, int] | None:
    """(width, height) from an image file's header, None when it is not an image PIL knows.

    The core's pixel limit (`media.MAX_IMAGE_PIXELS`) is this server's: a bigger image is refused
    here, before it is queued or decoded.
    """
    from PIL import Image

    from longva_cli.media import MAX_IMAGE_PIXELS

    try:
        with Image.open(item.path) as image:
            width, height = image.size
    except Image.DecompressionBombError:  # PIL refuses more than twice its limit before telling the size
        width = height = None
    except Exception:  # noqa: BLE001 - any header PIL cannot read: not an image; the worker says what it is
        return None
    limit = MAX_IMAGE_PIXELS
    if width is None or width * height > limit:
        size = f"{width}x{height} pixels" if width else f"more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels"
        raise APIError(
            400, f"{item.label} is an image of {size}; this server decodes images of at most {limit:,} pixels: send a smaller one.",
            param=item.param, code="image_too_large",
        )
    return width, height


def video_frames(item: MediaItem, frames: int | None, fps: float | None) -> int:
    """Frames the worker will take: exactly `frames` when sampling uniformly; at `fps`, the
    container's frame count and rate say how many (at most `frames`), else `frames`.

    The container's header is read with every frame skipped, as `longva ask` reads it: a small
    file claiming huge frames is refused here (400 naming the part), before any pixel exists.
    """
    from longva_cli import media

    with media_errors(item):
        header = media.probe_video(item.path)
        media.check_frame_size(item.path, header.width, header.height)
        if fps is None or frames is None:
            return frames or 0
        if not header.frames or not header.fps:
            return frames
        # The frame ids `encode` will take, bounded by `frames` whatever the container claims.
        return len(media.frame_ids_at_fps(header.frames, header.fps, fps, max_frames=frames))
