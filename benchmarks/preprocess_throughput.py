"""Frame preprocessing throughput: ours against transformers' CLIP image processor, equal output.

    python benchmarks/preprocess_throughput.py [--frames 64] [--repeats 3] [--smoke]

Both turn uint8 RGB frames into normalised 336x336 float32 tensors; the script checks the
outputs agree (max abs difference at most 1e-6, as tests/model/test_processing.py holds them; it exits
non-zero otherwise) and prints frames/s and the speed-up for two resolutions.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common import check, parse_args, ratio

SMOKE = {"frames": 2, "repeats": 1}


def best_of(fn, repeats: int) -> float:
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        timings.append(time.perf_counter() - started)
    return min(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parse_args(parser, SMOKE)

    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from longva_cli.model.config import ImageProcessing
    from longva_cli.model.processing import preprocess

    reference = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, resample=Image.BICUBIC)
    settings = ImageProcessing()
    print(f"torch threads: {torch.get_num_threads()}, frames per batch: {args.frames}")
    print(f"{'resolution':>12} {'transformers f/s':>17} {'longva f/s':>11} {'speed-up':>9} {'max |diff|':>11}")
    for width, height in ((640, 360), (1920, 1080)):
        frames = list(np.random.default_rng(0).integers(0, 256, (args.frames, height, width, 3), dtype=np.uint8))
        expected = reference(images=frames, return_tensors="pt")["pixel_values"]
        ours = preprocess(frames, settings)
        diff = (expected - ours).abs().max().item()
        size = f"{width}x{height}"
        check(expected.shape == ours.shape and diff <= 1e-6, f"both give the same {size} pixels ({tuple(ours.shape)}, max |diff| {diff:.2e})")
        slow = best_of(lambda: reference(images=frames, return_tensors="pt"), args.repeats)
        fast = best_of(lambda: preprocess(frames, settings), args.repeats)
        speed_up = ratio(slow, fast, f"the {size} speed-up")
        print(f"{size:>12} {args.frames / slow:17.1f} {args.frames / fast:11.1f} {speed_up:8.2f}x {diff:11.2e}")


if __name__ == "__main__":
    main()
