"""Peak memory of reading hostile and ordinary media: before and after the header checks and the
byte-bounded decoding of `Video.pixel_batches`.

    python benchmarks/media_memory.py            # all cases (a few minutes on 2 cores)
    python benchmarks/media_memory.py --quick    # skip the 8K video
    python benchmarks/media_memory.py --smoke    # every case on the smallest shapes that take its path

Each measurement runs in its own process and reports its peak RSS (VmHWM) above its RSS after
imports (Python, torch, PIL, PyAV, decord: about 220 MB). "naive" is the path before the fix: decode the image whole, or decode
16 frames at a time at full size with decord (PyAV where decord is missing) and preprocess them.
longva must refuse the two attacks before decoding and read the rest, where the naive path reads
everything; the script exits non-zero otherwise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import ROOT, check, parse_args, ratio, run_json

# The cases and their shapes: (label, width, height, frames in the file, frames read). A smoke run
# keeps every case at the smallest shape that takes the same path: the image just past longva's
# 8192 x 8192 limit, a video refused by its shape (16:1 at most), one video for decord and one past
# 4K (4096 x 2160), which PyAV decodes.
SHAPES = {
    "full": {
        "bomb": ("13000x13000 PNG", 13000, 13000, 1, 1),
        "attack": ("16 frames 7680x7680 H.264", 7680, 7680, 16, 16),
        "videos": [("1080p, 32 of 64 frames", 1920, 1080, 64, 32), ("4K, 32 of 64 frames", 3840, 2160, 64, 32)],
        "beyond_4k": ("8K (8192x4352), 16 frames", 8192, 4352, 16, 16),
    },
    "smoke": {
        "bomb": ("8200x8200 PNG", 8200, 8200, 1, 1),
        "attack": ("2 frames 1056x64 H.264 (16.5:1)", 1056, 64, 2, 2),
        "videos": [("320x240, 4 of 8 frames", 320, 240, 8, 4)],
        "beyond_4k": ("4112x2160, 2 frames", 4112, 2160, 2, 2),
    },
}

MEASURE = r"""
import json, sys
from pathlib import Path
import torch  # noqa: F401 - part of the baseline, as in every command
from longva_cli import media
from longva_cli.errors import LongVAError
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
    return run_json([sys.executable, "-c", MEASURE, kind, way, str(path), str(frames)])


def pattern_video(path: Path, width: int, height: int, frames: int) -> Path:
    from support.media import write_video

    return write_video(path, frames=frames, width=width, height=height, fps=8)


def bomb_png(path: Path, side: int) -> Path:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    Image.new("RGB", (side, side), (40, 90, 160)).save(path, optimize=False)
    return path


def main() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from support.media import write_blank_video  # all-black H.264: a small file whatever the frame size

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the video past 4K (the slowest to encode and decode)")
    args = parse_args(parser, {})
    shapes = SHAPES["smoke" if args.smoke else "full"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        label, side, _, _, _ = shapes["bomb"]
        cases = [(label, "image", bomb_png(folder / "bomb.png", side), 1, "refused")]
        label, width, height, frames, read = shapes["attack"]
        cases.append((label, "video", write_blank_video(folder / "attack.mp4", width, height, frames), read, "refused"))
        for index, (label, width, height, frames, read) in enumerate(shapes["videos"]):
            cases.append((label, "video", pattern_video(folder / f"video-{index}.mp4", width, height, frames), read, "read"))
        if not args.quick:
            label, width, height, frames, read = shapes["beyond_4k"]
            cases.append((label, "video", write_blank_video(folder / "beyond-4k.mp4", width, height, frames), read, "read"))
        print("| input | file size | naive peak MB | longva peak MB | naive / longva | longva |")
        print("|---|---:|---:|---:|---:|---|")
        for name, kind, path, frames, expected in cases:
            naive, ours = measure(kind, "naive", path, frames), measure(kind, "longva", path, frames)
            check(naive["outcome"] == "read", f"the naive path reads {name}")
            check(ours["outcome"] == expected, f"longva's outcome on {name} is '{expected}', not '{ours['outcome']}'")
            refused = expected == "refused"
            shown = "-" if refused else f"{ratio(naive['peak_mb'], ours['peak_mb'], f'naive / longva peak memory on {name}'):,.1f}x"
            print(
                f"| {name} | {path.stat().st_size / 1024:,.0f} KB | {naive['peak_mb']:,.0f} | {ours['peak_mb']:,.0f} "
                f"| {shown} | {'refused before decoding' if refused else 'read'} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
