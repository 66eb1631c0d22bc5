"""Peak memory of reading hostile and ordinary media: before and after the header checks and the
byte-bounded decoding of `Video.pixel_batches`.

    python benchmarks/media_memory.py            # all cases (a few minutes on 2 cores)
    python benchmarks/media_memory.py --quick    # skip the 8K video

Each measurement runs in its own process and reports its peak RSS (VmHWM) above its RSS after
imports (Python, torch, PIL, PyAV, decord: about 220 MB). "naive" is the path before the fix: decode the image whole, or decode
16 frames at a time at full size with decord (PyAV where decord is missing) and preprocess them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MEASURE = r"""
import json, sys
from pathlib import Path
import torch  # noqa: F401 - part of the baseline, as in every command
from longva_cli.errors import LongVAError
from longva_cli.model import media
from longva_cli.model.config import ImageProcessing
from longva_cli.model.processing import preprocess

def status_mb(field):
    # VmHWM, unlike ru_maxrss, starts afresh at exec: a large parent does not leak into it.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024

def peak_mb():
    return status_mb("VmHWM")

kind, way, path, frames = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
base = status_mb("VmRSS")
outcome = "read"
try:
    if kind == "image" and way == "naive":
        import warnings
        from PIL import Image
        warnings.simplefilter("ignore")  # PIL only warns below 179 megapixels, and decodes
        Image.open(path).convert("RGB")
    elif kind == "image":
        media.open_image(path)
    elif way == "naive":
        import decord
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=0)
        ids = media.uniform_frame_ids(len(reader), frames)
        for start in range(0, len(ids), 16):
            preprocess(list(reader.get_batch(ids[start:start + 16]).asnumpy()), ImageProcessing())
    else:
        video = media.open_video(path)
        for _ in video.pixel_batches(media.uniform_frame_ids(video.num_frames, frames), ImageProcessing()):
            pass
except LongVAError:
    outcome = "refused"
print(json.dumps({"peak_mb": peak_mb() - base, "outcome": outcome}))
"""


def measure(kind: str, way: str, path: Path, frames: int = 16) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, kind, way, str(path), str(frames)], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def pattern_video(path: Path, width: int, height: int, frames: int) -> Path:
    from media import write_video

    return write_video(path, frames=frames, width=width, height=height, fps=8)


def bomb_png(path: Path, side: int) -> Path:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    Image.new("RGB", (side, side), (40, 90, 160)).save(path, optimize=False)
    return path


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from media import write_blank_video  # all-black H.264: a small file whatever the frame size

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the 8K video (the slowest to encode and decode)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cases = [
            ("13000x13000 PNG", "image", bomb_png(folder / "bomb.png", 13000), 1),
            ("16 frames 7680x7680 H.264", "video", write_blank_video(folder / "attack.mp4", 7680, 7680, 16), 16),
            ("1080p, 32 of 64 frames", "video", pattern_video(folder / "hd.mp4", 1920, 1080, 64), 32),
            ("4K, 32 of 64 frames", "video", pattern_video(folder / "4k.mp4", 3840, 2160, 64), 32),
        ]
        if not args.quick:
            cases.append(("8K (8192x4352), 16 frames", "video", write_blank_video(folder / "8k.mp4", 8192, 4352, 16), 16))
        print("| input | file size | naive peak MB | longva peak MB | naive / longva | longva |")
        print("|---|---:|---:|---:|---:|---|")
        for name, kind, path, frames in cases:
            naive, ours = measure(kind, "naive", path, frames), measure(kind, "longva", path, frames)
            refused = ours["outcome"] == "refused"
            ratio = "-" if refused else f"{naive['peak_mb'] / ours['peak_mb']:,.1f}x"
            print(
                f"| {name} | {path.stat().st_size / 1024:,.0f} KB | {naive['peak_mb']:,.0f} | {ours['peak_mb']:,.0f} "
                f"| {ratio} | {'refused before decoding' if refused else 'read'} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
