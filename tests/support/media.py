"""Short real videos and images made by the tests themselves (PyAV encodes H.264)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def frame_pattern(index: int, width: int, height: int) -> np.ndarray:
    """A frame that differs from its neighbours: a moving square on a colour ramp."""
    y, x = np.mgrid[0:height, 0:width]
    frame = np.stack([(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)), np.full_like(x, (index * 37) % 256)], -1)
    frame = frame.astype(np.uint8)
    side = max(8, min(width, height) // 4)
    left = (index * 7) % max(width - side, 1)
    frame[height // 3 : height // 3 + side, left : left + side] = (255, 32, 32)
    return frame


def write_video(path: Path, frames: int = 30, width: int = 160, height: int = 96, fps: int = 10, codec: str = "libx264") -> Path:
    """Encode `frames` frames to `path` (mp4 or mkv by suffix)."""
    import av

    path = Path(path)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.options = {"g": "5"}
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(frame_pattern(index, width, height), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_image(path: Path, width: int = 500, height: int = 300) -> Path:
    from PIL import Image

    Image.fromarray(frame_pattern(3, width, height)).save(path)
    return path


def write_blank_video(path: Path, width: int, height: int, frames: int = 1) -> Path:
    """A few all-black H.264 frames: a file of kilobytes, whatever the frame size."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "tune": "zerolatency"}
        frame = av.VideoFrame(width, height, "yuv420p")
        for plane in frame.planes:
            plane.update(bytes(plane.buffer_size))
        for _ in range(frames):
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header says `width` x `height` (its pixel data is an 8x8 image's)."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR: 8-byte signature, length, type, then sizes
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)
