"""Videos by path (offline `LLM`) or by URL (`vllm serve`), decoded as `longva ask` decodes them.

vLLM's own video loader reads with OpenCV and never repeats a frame; LongVA's frames come from
decord at `linspace(0, total - 1, n)` (repeats allowed). Decoding with the native code keeps the
frames, and so the answers, the same as `longva ask`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from vllm.model_executor.models.config import VerifyAndUpdateConfig
from vllm.multimodal.video import VideoLoader

from longva_cli import media as media_io
from longva_cli.defaults import FRAMES
from longva_cli.errors import LongVAError

BACKEND = "longva"  # the name `--media-io-kwargs '{"video": {"video_backend": ...}}'` takes
_DECODE_BATCH = 64  # frames decoded at a time


def load_video(path: str | Path, frames: int | None = FRAMES, fps: float | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode a video as `longva ask` does: ([t, h, w, 3] uint8 frames, metadata).

    `frames` frames spread uniformly (None: every frame), or with `fps` that many frames a
    second, `frames` then capping the count. Pass the result as `{"video": ...}` in vLLM's
    `multi_modal_data`.
    """
    video = media_io.open_video(media_io.check_file(Path(path)))
    if fps is not None:
        ids = media_io.frame_ids_at_fps(video.num_frames, video.fps, fps, max_frames=frames)
    else:
        ids = media_io.uniform_frame_ids(video.num_frames, frames or video.num_frames)
    pixels = np.concatenate(list(video.batches(ids, _DECODE_BATCH)))
    metadata = {
        "total_num_frames": video.num_frames,
        "fps": video.fps,
        "duration": video.num_frames / video.fps,
        "video_backend": BACKEND,
        "frames_indices": ids,
        "do_sample_frames": False,
    }
    return pixels, metadata


class LongVAVideoLoader(VideoLoader):
    """vLLM's loader for `video_url` parts, decoding as `load_video`.

    vLLM passes `num_frames` (32 unless `--media-io-kwargs` says otherwise; -1 for every
    frame) and `fps` (-1 when not set).
    """

    @classmethod
    def load_bytes(cls, data: bytes, num_frames: int = FRAMES, fps: float = -1, **kwargs) -> tuple[np.ndarray, dict[str, Any]]:
        # decord reads files: the bytes go to a temporary one for the length of the decode.
        with tempfile.NamedTemporaryFile(suffix=".video") as file:
            file.write(data)
            file.flush()
            try:
                return load_video(file.name, frames=num_frames if num_frames > 0 else None, fps=fps if fps > 0 else None)
            except LongVAError as err:  # vLLM answers a ValueError with 400 Bad Request
                raise ValueError(str(err).replace(file.name, "the video")) from None


class LongVAVideoDefault(VerifyAndUpdateConfig):
    """vLLM's per-architecture config hook: LongVA servers decode `video_url` parts with
    `LongVAVideoLoader` unless `--media-io-kwargs` names another loader."""

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        if model_config.multimodal_config is not None:
            video = model_config.multimodal_config.media_io_kwargs.setdefault("video", {})
            video.setdefault("video_backend", BACKEND)
