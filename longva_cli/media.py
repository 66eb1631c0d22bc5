"""Reading media: images and videos, recognised by content rather than by file name.

Videos are decoded with decord, as the original did, so frame indices mean the same frames;
where decord has no wheel (Python >= 3.12, aarch64) PyAV decodes instead, keeping the same
indices by decoding in order.

A small file can claim a huge picture (a 490 KB PNG of 13000x13000, a 49 KB H.264 video of
7680x7680 frames), so sizes are read from the image header or the video container and checked
against the limits below before any pixel is decoded; video frames are then decoded a bounded
number of bytes at a time.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from longva_cli.defaults import VISION_BATCH
from longva_cli.errors import LongVAError

if TYPE_CHECKING:
    import torch

    from longva_cli.model.config import ImageProcessing

# Images: UniRes shows the model at most a few megapixels of any image (its largest pinpoint
# canvas), so a limit far above that loses nothing and keeps a decoded image under ~270 MB.
MAX_IMAGE_PIXELS = 8192 * 8192

# Video frames: the largest picture the H.264, HEVC and AV1 level tables allow (8K, 8192 x 4352).
MAX_FRAME_PIXELS = 8192 * 4352
# A frame is resized to 336 px on its short side and V-NIAH pads it to a square of its long
# side: these bound both copies (16:1 is four times wider than the widest cinema formats).
MAX_FRAME_SIDE = 8192
MAX_FRAME_ASPECT = 16

# decord keeps about ten decoded RGB frames in flight, whatever the batch (1.2-1.7 GB for one
# 8K frame, measured): above 4K, PyAV decodes instead, in order, one frame at a time. Its RGB
# conversion is the same FFmpeg path, and gave identical pixels for 8-bit video in our tests.
DECORD_MAX_PIXELS = 4096 * 2160

# Decoded frames held at once by `Video.pixel_batches`, counted with their working copies.
FRAME_BATCH_BYTES = 128 * 2**20


def check_file(path: Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise LongVAError(f"{path} does not exist; check the path.")
    if path.is_dir():
        raise LongVAError(f"{path} is a folder; give a video or image file.")
    if path.stat().st_size == 0:
        raise LongVAError(f"{path} is empty (0 bytes); check the file.")
    return path


# ---- images ------------------------------------------------------------------------------------


def open_image(path: Path) -> Image.Image | None:
    """The RGB image at `path`, or None when the file is not an image (e.g. a video).

    Its size is checked from the header, before any pixel is decoded.
    """
    return _read_image(path, str(path))


def image_from_bytes(data: bytes, name: str) -> Image.Image:
    """An RGB image from encoded bytes (a data set's column, an upload), checked as `open_image`
    checks a file; `name` says where the bytes came from in messages."""
    image = _read_image(io.BytesIO(data), name)
    if image is None:
        raise LongVAError(f"{name} is not an image that can be read.")
    return image


def _too_big_image(name: str, size: str) -> LongVAError:
    return LongVAError(
        f"{name} is {size}, more than the {MAX_IMAGE_PIXELS / 1e6:.0f}-megapixel limit (8192 x 8192) for images; "
        "scale it down first (the model sees a few megapixels of it at most)."
    )


def _read_image(source: Path | BinaryIO, name: str) -> Image.Image | None:
    with warnings.catch_warnings():
        # PIL warns past 89 megapixels; our own, lower limit is checked below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(source)
        except UnidentifiedImageError:
            return None
        except Image.DecompressionBombError:  # PIL's own refusal, past 179 megapixels
            raise _too_big_image(name, "larger than 179 megapixels") from None
        except OSError as err:
            raise LongVAError(f"{name} looks like an image but cannot be read ({err}); check the file.") from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        image.close()
        raise _too_big_image(name, f"{width} x {height} pixels")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt image data
        raise LongVAError(f"{name} looks like an image but cannot be read ({err}); check the file.") from None
    return image.convert("RGB")


# ---- videos ------------------------------------------------------------------------------------


def check_frame_size(path: Path, width: int, height: int) -> None:
    """Refuse frames too big to decode in bounded memory, from the sizes the container declares."""
    if width < 1 or height < 1:
        raise LongVAError(f"{path} does not declare its frame size ({width} x {height}); it is damaged: re-encode or download it again.")
    if max(width, height) > MAX_FRAME_SIDE or width * height > MAX_FRAME_PIXELS or max(width, height) > MAX_FRAME_ASPECT * min(width, height):
        raise LongVAError(
            f"{path} has {width} x {height} frames, beyond what longva decodes (8K: at most {MAX_FRAME_PIXELS:,} pixels "
            f"(8192 x 4352), {MAX_FRAME_SIDE} on a side, {MAX_FRAME_ASPECT}:1); scale it down first, "
            "e.g. `ffmpeg -i IN -vf scale=-2:1080 OUT.mp4` (frames are resized to 336 px anyway)."
        )


def _damaged(path: Path, ids: list[int], total: int) -> LongVAError:
    # Decoders' own messages name their build paths and internal calls: nothing a user can act on.
    where = f"frame {ids[0]}" if ids[0] == ids[-1] else f"frames {ids[0]}..{ids[-1]}"
    return LongVAError(
        f"{path} is truncated or damaged: {where} of its {total} cannot be decoded; copy or download it again, "
        "or re-encode what plays (e.g. with ffmpeg)."
    )


@dataclass
class Video:
    """An open video: frame count, average frame rate, frame size and access by frame index.

    `num_frames`, `width` and `height` come from the container, before any frame is decoded:
    enough to refuse a frame count or size before allocating for it (`frame_bytes`).
    """

    path: Path
    num_frames: int
    fps: float
    width: int
    height: int
    _reader: object

    @property
    def frame_bytes(self) -> int:
        """Bytes of one decoded RGB frame."""
        return self.width * self.height * 3

    def batches(self, frame_ids: list[int], batch_size: int, *, max_bytes: int | None = None) -> Iterator[np.ndarray]:
        """The frames at `frame_ids` as [b, h, w, 3] uint8 arrays, at most `batch_size` at a
        time and, with `max_bytes`, at most that many bytes of frames (but at least one)."""
        if max_bytes is not None:
            batch_size = max(1, min(batch_size, max_bytes // self.frame_bytes))
        for start in range(0, len(frame_ids), batch_size):
            yield self._get(frame_ids[start : start + batch_size])

    def pixel_batches(
        self,
        frame_ids: list[int],
        settings: "ImageProcessing",
        *,
        batch_size: int = VISION_BATCH,
        pad_to_square: bool = False,
        max_bytes: int = FRAME_BATCH_BYTES,
    ) -> Iterator["torch.Tensor"]:
        """CLIP pixel values of the frames at `frame_ids`, float32 [batch_size, 3, crop, crop]
        (the last batch may be shorter), equal to `preprocess` of the full decoded frames.

        Frames are decoded a few at a time, as many as fit `max_bytes` together with their
        working copies (a decoder's output, PIL's 4-byte pixels, the V-NIAH square), and each
        few is preprocessed at once: only 336-px frames accumulate, whatever the video's size.
        """
        import torch

        from longva_cli.model.processing import preprocess

        side = max(self.width, self.height)
        per_frame = 7 * self.width * self.height + (4 * side * side if pad_to_square else 0)
        decode_size = max(1, min(batch_size, max_bytes // per_frame))
        ready: list[torch.Tensor] = []
        held = 0
        for frames in self.batches(frame_ids, decode_size):
            ready.append(preprocess(list(frames), settings, pad_to_square=pad_to_square))
            held += len(frames)
            del frames
            while held >= batch_size:
                pixels = torch.cat(ready)
                yield pixels[:batch_size]
                ready, held = [pixels[batch_size:]], held - batch_size
        if held:
            yield torch.cat(ready)

    def _get(self, ids: list[int]) -> np.ndarray:
        if isinstance(self._reader, _PyAVReader):
            return self._reader.get(ids)
        try:
            return self._reader.get_batch(ids).asnumpy()
        except Exception:  # noqa: BLE001 - decord raises DECORDError/RuntimeError for broken data
            raise _damaged(self.path, ids, self.num_frames) from None


# Opening a container makes FFmpeg decode a frame or two to describe the streams (140 MB for
# one 7680x7680 frame); with frames skipped it reads the sizes from the headers alone.
HEADERS_ONLY = {"skip_frame": "all"}


@dataclass
class VideoHeader:
    """What a video's container says of its first video stream, before any frame is decoded."""

    width: int
    height: int
    frames: int  # the frame count the container declares, else duration x rate; 0 if it says neither
    fps: float  # the average frame rate; 0.0 if the container does not say


def probe_video(path: Path) -> VideoHeader:
    """The header of the first video stream, read through PyAV with every frame skipped (nothing
    is decoded, whatever the frame size); a LongVAError when `path` is not a video with a stream.

    decord alone would take any file FFmpeg can guess a format for (a .txt file opens as a
    one-frame "tty" video), so the container is checked first.
    """
    import av

    try:
        with av.open(str(path), options=HEADERS_ONLY) as container:
            if not container.streams.video:
                raise LongVAError(f"{path} has no video stream; give a video or an image.")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or 0)
            frames = stream.frames
            if not frames and fps:
                seconds = float(stream.duration * stream.time_base) if stream.duration else (container.duration or 0) / 1e6
                frames = math.ceil(seconds * fps)
            return VideoHeader(stream.codec_context.width, stream.codec_context.height, int(frames), fps)
    except av.EOFError:
        raise LongVAError(f"{path} ends before its first video frame: it has no frames or is truncated.") from None
    except av.FFmpegError:
        with open(path, "rb") as file:
            if file.read(8)[4:] == b"ftyp":  # an MP4/MOV whose index (the moov box, often last) is cut off
                raise LongVAError(f"{path} is an MP4/MOV file whose index cannot be read: it is truncated or damaged; copy or download it again.") from None
        raise LongVAError(f"{path} is neither an image nor a video that can be decoded; check the file.") from None


def open_video(path: Path) -> Video:
    """Open a video, or raise a LongVAError saying why it is not usable."""
    header = probe_video(path)
    width, height = header.width, header.height
    check_frame_size(path, width, height)
    try:
        import decord
    except ImportError:
        decord = None
    if decord is None or width * height > DECORD_MAX_PIXELS:
        reader = _PyAVReader(path)
        return Video(path, reader.num_frames, reader.fps, width, height, reader)
    # FFmpeg inside decord logs every damaged packet on stderr; our errors say it once.
    decord.logging.set_level(decord.logging.QUIET)
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=0)
    except Exception:  # noqa: BLE001 - decord raises DECORDError/RuntimeError for anything it cannot open
        # The container and its video stream were fine (probed above): the frames are not.
        raise LongVAError(
            f"{path} has a video stream but no decodable frames: it is empty, truncated or damaged; copy or download it again."
        ) from None
    if len(reader) == 0:
        raise LongVAError(f"{path} has no video frames; give a video with at least one frame.")
    return Video(path, len(reader), float(reader.get_avg_fps()), width, height, reader)


class _PyAVReader:
    """Frame access by index through PyAV: decodes in order and keeps the frames asked for.

    Successive requests for later frames continue the same decoding pass, so a video read in
    batches of increasing frame ids is decoded once.
    """

    def __init__(self, path: Path) -> None:
        import av

        self.path = path
        try:
            with av.open(str(path), options=HEADERS_ONLY) as container:
                stream = container.streams.video[0]
                self.fps = float(stream.average_rate or 0) or 1.0
                # Counting packets reads the container without decoding a frame.
                self.num_frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
        except av.FFmpegError:
            raise LongVAError(f"{path} cannot be read: it is truncated or damaged; copy or download it again.") from None
        if self.num_frames == 0:
            raise LongVAError(f"{path} has no video frames; give a video with at least one frame.")
        self._container = None
        self._frames = None
        self._next = 0  # index of the frame `_frames` yields next

    def _restart(self) -> None:
        import av

        self.close()
        self._container = av.open(str(self.path))
        self._frames = self._container.decode(video=0)
        self._next = 0

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None

    def get(self, ids: list[int]) -> np.ndarray:
        import av

        if self._frames is None or min(ids) < self._next:
            self._restart()
        slots: dict[int, list[int]] = {}  # frame index -> its places in the batch (ids may repeat)
        for slot, index in enumerate(ids):
            slots.setdefault(index, []).append(slot)
        out = None
        decoded = set()
        try:
            while self._next <= max(ids):
                frame = next(self._frames, None)
                if frame is None:
                    break
                index, self._next = self._next, self._next + 1
                if index not in slots:
                    continue
                # A stream may change its frame size midway: check each frame kept.
                check_frame_size(self.path, frame.width, frame.height)
                pixels = frame.to_ndarray(format="rgb24")  # [h, w, 3]
                if out is None:
                    out = np.empty((len(ids), *pixels.shape), dtype=np.uint8)
                if pixels.shape != out.shape[1:]:
                    raise LongVAError(f"{self.path} changes its frame size midway; re-encode it at one size.")
                out[slots[index]] = pixels
                decoded.add(index)
        except av.FFmpegError:
            self.close()
            self._frames = None
            raise _damaged(self.path, [i for i in ids if i not in decoded], self.num_frames) from None
        missing = sorted(set(slots) - decoded)
        if missing:
            raise _damaged(self.path, missing, self.num_frames)
        return out


# ---- which frames ------------------------------------------------------------------------------


def uniform_frame_ids(total: int, count: int) -> list[int]:
    """`count` frame ids spread evenly over `total` frames: linspace(0, total-1, count) floored.

    Duplicates are allowed (count > total), as in the original.
    """
    if count < 1:
        raise LongVAError(f"the number of frames must be at least 1, got {count}.")
    return np.linspace(0, total - 1, count, dtype=int).tolist()


def frame_ids_at_fps(total: int, video_fps: float, fps: float, max_frames: int | None = None) -> list[int]:
    """Every `round(video_fps / fps)`-th frame from the first: V-NIAH's 1 frame a second at fps=1.

    With `max_frames`, a video that would give more frames than that gives `max_frames` frames
    spread evenly over the whole video instead (as `uniform_frame_ids`), so the cap lowers the
    rate rather than cutting off the end. Without it every sampled frame is returned (V-NIAH's
    haystack takes the first N seconds from these).
    """
    if not (math.isfinite(fps) and fps > 0):
        raise LongVAError(f"--fps must be positive, got {fps}.")
    if not (math.isfinite(video_fps) and video_fps > 0):
        raise LongVAError(f"the video declares no usable frame rate ({video_fps}); sample it by --frames instead of --fps.")
    step = max(1, round(video_fps / fps))
    count = -(-total // step)  # len(range(0, total, step))
    if max_frames is not None and count > max_frames:
        return uniform_frame_ids(total, max_frames)
    return list(range(0, total, step))
