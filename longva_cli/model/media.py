"""Reading media: images and videos, recognised by content rather than by file name.

Videos are decoded with decord, as the original did, so frame indices mean the same frames;
where decord has no wheel (Python >= 3.12, aarch64) PyAV decodes instead, keeping the same
indices by decoding in order.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from longva_cli.errors import LongVAError


def open_image(path: Path) -> Image.Image | None:
    """The image at `path`, or None when the file is not an image (e.g. a video)."""
    try:
        image = Image.open(path)
        image.load()
    except UnidentifiedImageError:
        return None
    except OSError as err:  # truncated or corrupt image data
        raise LongVAError(f"{path} looks like an image but cannot be read ({err}); check the file.") from None
    return image.convert("RGB")


def check_file(path: Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise LongVAError(f"{path} does not exist; check the path.")
    if path.is_dir():
        raise LongVAError(f"{path} is a folder; give a video or image file.")
    if path.stat().st_size == 0:
        raise LongVAError(f"{path} is empty (0 bytes); check the file.")
    return path


@dataclass
class Video:
    """An open video: frame count, average frame rate and random access by frame index."""

    path: Path
    num_frames: int
    fps: float
    _reader: object

    def batches(self, frame_ids: list[int], batch_size: int) -> Iterator[np.ndarray]:
        """The frames at `frame_ids` as [b, h, w, 3] uint8 arrays, `batch_size` at a time."""
        for start in range(0, len(frame_ids), batch_size):
            yield self._get(frame_ids[start : start + batch_size])

    def _get(self, ids: list[int]) -> np.ndarray:
        try:
            if isinstance(self._reader, _PyAVReader):
                return self._reader.get(ids)
            return self._reader.get_batch(ids).asnumpy()
        except LongVAError:
            raise
        except Exception as err:  # noqa: BLE001 - decoders raise their own types for broken data
            raise LongVAError(f"{self.path} could not be decoded at frames {ids[0]}..{ids[-1]} ({err}); the file may be truncated.") from None


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence what FFmpeg inside decord prints straight to fd 2; our own message says it better."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def probe_video(path: Path) -> None:
    """Check with FFmpeg's demuxers (through PyAV) that `path` is a container with a video stream.

    decord alone would take any file FFmpeg can guess a format for (a .txt file opens as a
    one-frame "tty" video), so the container is checked first.
    """
    import av

    try:
        with av.open(str(path)) as container:
            has_video = bool(container.streams.video)
    except av.EOFError:
        raise LongVAError(f"{path} ends before its first video frame: it has no frames or is truncated.") from None
    except av.FFmpegError:
        raise LongVAError(f"{path} is neither an image nor a video that can be decoded; check the file.") from None
    if not has_video:
        raise LongVAError(f"{path} has no video stream; give a video or an image.")


def open_video(path: Path) -> Video:
    """Open a video, or raise a LongVAError saying why it is not usable."""
    probe_video(path)
    try:
        import decord
    except ImportError:
        reader = _PyAVReader(path)
        return Video(path, reader.num_frames, reader.fps, reader)
    try:
        with _quiet_native_stderr():
            reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=0)
    except Exception:  # noqa: BLE001 - decord raises DECORDError/RuntimeError for anything it cannot open
        # The container and its video stream were fine (probed above): the frames are not.
        raise LongVAError(f"{path} has a video stream but no decodable frames; the file may be empty or truncated.") from None
    if len(reader) == 0:
        raise LongVAError(f"{path} has no video frames; give a video with at least one frame.")
    return Video(path, len(reader), float(reader.get_avg_fps()), reader)


class _PyAVReader:
    """Frame access by index through PyAV: decodes in order and keeps the frames asked for."""

    def __init__(self, path: Path) -> None:
        import av

        self.path = path
        try:
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                self.fps = float(stream.average_rate or 0) or 1.0
                self.num_frames = stream.frames or sum(1 for _ in container.decode(stream))
        except av.FFmpegError:
            raise LongVAError(f"{path} could not be decoded; the file may be truncated.") from None
        if self.num_frames == 0:
            raise LongVAError(f"{path} has no video frames; give a video with at least one frame.")

    def get(self, ids: list[int]) -> np.ndarray:
        import av

        wanted = set(ids)
        frames = {}
        with av.open(str(self.path)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                if index in wanted:
                    frames[index] = frame.to_ndarray(format="rgb24")
                if index >= max(ids):
                    break
        missing = wanted - set(frames)
        if missing:
            raise LongVAError(f"{self.path} ends before frame {min(missing)}; the file may be truncated.")
        return np.stack([frames[i] for i in ids])


def uniform_frame_ids(total: int, count: int) -> list[int]:
    """`count` frame ids spread evenly over `total` frames: linspace(0, total-1, count) floored.

    Duplicates are allowed (count > total), as in the original.
    """
    if count < 1:
        raise LongVAError(f"the number of frames must be at least 1, got {count}.")
    return np.linspace(0, total - 1, count, dtype=int).tolist()


def frame_ids_at_fps(total: int, video_fps: float, fps: float, max_frames: int | None = None) -> list[int]:
    """Every `round(video_fps / fps)`-th frame from the first: V-NIAH's 1 frame a second at fps=1."""
    if fps <= 0:
        raise LongVAError(f"--fps must be positive, got {fps}.")
    step = max(1, round(video_fps / fps))
    ids = list(range(0, total, step))
    return ids[:max_frames] if max_frames else ids
