"""Cost of a V-NIAH grid: our KV-reusing scorer against the original's full forward per cell.

    python benchmarks/niah_cost.py [--frames 4 8 12 16] [--depth-step 0.2] [--hidden 256] [--smoke]

A tiny-but-wide LongVA (hidden 256, 2 layers, Qwen2's real 152,064-token vocabulary, so the
logits cost what they cost in the real model) scores five needles over a grid (the depth step
is `longva niah video`'s, 0.2, unless --depth-step says otherwise), on random
haystack and needle embeddings (the vision tower is the same work for both ways and is left
out). Each way runs in its own process and reports:

- tokens: positions run through the decoder (ours: only what is not already in the cache);
- seconds: wall time of the scoring loop;
- peak RSS: ru_maxrss of the process, reached at the largest cell (memory grows with the
  sequence);
- logits: the float32 logits held at the largest cell (the original kept seq x vocab).

ours  = `longva niah video`'s path: cells ordered by needle position, the KV cache of the
        shared prefix kept and cropped, chunked prefill, logits at the answer positions only.
naive = the original: one forward over each whole sequence with logits at every position.

Both must give the same predicted ids for every needle, and ours must forward fewer tokens;
the script checks both and exits non-zero otherwise. The figures, the command, the machine and
the date replace the section "## niah cost" of benchmarks/RESULTS.md (--results: another file).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

from common import check, command_line, parse_args, provenance, ratio, run_json, write_section

VOCAB = 152_064
ANSWERS = ["B", "Yellow", "200", "C", "A"]
HEADING = "## niah cost"
SMOKE = {"frames": [2, 4], "hidden": 64, "vocab": 512}  # the depth grid stays the default one


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def measure(way: str, checkpoint: Path, frames: list[int], depth_step: float) -> dict:
    import torch

    from longva_cli import LongVA
    from longva_cli.engine import PrefixCache
    from longva_cli.niah import scoring
    from longva_cli.niah.settings import depth_grid
    from longva_cli.niah.video import Needle, VideoNeedlePrompts, video_units

    longva = LongVA.from_pretrained(str(checkpoint), device="cpu")
    torch.manual_seed(0)
    d = longva.model.config.hidden_size
    haystack = torch.randn(max(frames), 144, d)  # [frames, 144, d]
    needles = [Needle(None, f"\nQuestion {i}?", answer) for i, answer in enumerate(ANSWERS)]
    prompts = VideoNeedlePrompts(longva, haystack, needles, torch.randn(len(needles), 144, d))
    units = sorted(video_units(frames, depth_grid(depth_step), len(needles)), key=lambda u: u.order)
    language_model = longva.model.language_model
    cache = PrefixCache(language_model, 4096)
    predictions, tokens = {}, 0
    started = time.perf_counter()
    for unit in units:
        sequence = prompts.sequence(unit.size, unit.depth, unit.index, with_answer=True)
        answer = prompts.answer_ids(unit.index)
        if way == "ours":
            predicted = scoring.teacher_forced(cache, sequence, answer)
        else:
            predicted = scoring.naive_teacher_forced(language_model, sequence.embed(0, len(sequence)), len(answer))
            tokens += len(sequence)
        predictions[f"{unit.size}/{unit.depth}/{unit.index}"] = predicted
    seconds = time.perf_counter() - started
    largest = len(prompts.sequence(max(frames), 1.0, 0, with_answer=True))
    longest_answer = max(len(prompts.answer_ids(i)) for i in range(len(needles)))
    logits_positions = longest_answer if way == "ours" else largest
    return {
        "logits_mb": logits_positions * language_model.config.vocab_size * 4 / 2**20,
        "way": way, "tokens": cache.forwarded if way == "ours" else tokens, "seconds": seconds, "cells": len(units) // len(needles),
        "sequences": len(units), "largest_sequence": largest, "rss_peak_gb": rss_gb(), "predictions": predictions,
    }


def run_way(way: str, checkpoint: Path, args) -> dict:
    return run_json([sys.executable, __file__, "--way", way, "--checkpoint", str(checkpoint), "--frames", *map(str, args.frames),
                     "--depth-step", str(args.depth_step)])


def table(ours: dict, naive: dict) -> str:
    def row(name: str, key: str, fmt: str) -> str:
        return f"| {name} | {ours[key]:{fmt}} | {naive[key]:{fmt}} | {ratio(naive[key], ours[key], f'naive / ours {key}'):.2f}x |"

    return "\n".join([
        "| measure | ours (KV reuse) | naive (full forward per cell) | naive / ours |",
        "|---|---:|---:|---:|",
        row("decoder tokens forwarded", "tokens", ",.0f"),
        row("wall time of the grid (s)", "seconds", ".1f"),
        row("peak RSS (GB)", "rss_peak_gb", ".2f"),
        row("logits at the largest cell (MB, float32)", "logits_mb", ",.2f"),
    ])


def main() -> None:
    from longva_cli.errors import LongVAError
    from longva_cli.niah.settings import VideoSettings, depth_grid

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[4, 8, 12, 16])
    parser.add_argument("--depth-step", type=float, default=VideoSettings.depth_step, help="as `longva niah video --depth-step`")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--way", choices=["ours", "naive"])
    parser.add_argument("--checkpoint", type=Path)
    args = parse_args(parser, SMOKE, records=True)
    try:
        depths = depth_grid(args.depth_step)
    except LongVAError as error:
        parser.error(str(error))
    if args.way:
        print(json.dumps(measure(args.way, args.checkpoint, args.frames, args.depth_step)))
        return

    from longva_cli.model.tiny import write_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_tiny_checkpoint(Path(tmp) / "wide", hidden_size=args.hidden, vocab_size=args.vocab, max_shard_size="2GB")
        ours, naive = run_way("ours", checkpoint, args), run_way("naive", checkpoint, args)
    same = ours["predictions"] == naive["predictions"]
    print(f"identical predicted ids on all {ours['sequences']} needle sequences: {same}")
    check(same, "the two ways predict the same ids for every needle")
    check(ours["tokens"] < naive["tokens"], f"KV reuse forwards fewer tokens ({ours['tokens']:,} against {naive['tokens']:,})")
    shown = table(ours, naive)
    print(shown)
    write_section(args.results, HEADING, "\n".join([
        f"Command: `{command_line()}` ({provenance()}, no GPU).",
        f"Model: random LongVA, hidden {args.hidden}, 2 layers, vocab {args.vocab:,}, float32, SDPA attention. Grid: frames "
        f"{args.frames}, depths {depths} ({ours['cells']} cells x {len(ANSWERS)} needles = {ours['sequences']} sequences, the largest "
        f"{ours['largest_sequence']:,} tokens); random haystack and needle embeddings (the vision tower is left out: same work for both).",
        f"Each way in its own process; peak RSS is ru_maxrss, reached at the largest cell. Predicted ids identical on every sequence: {same}.",
        "",
        shown,
        "",
        "At the real scale (Qwen2-7B, 3000 frames = 432K tokens) the naive logits alone would be 432K x 152,064 x 4 bytes = 263 GB; "
        "ours computes them at the answer tokens only, and the KV cache (25 GB in bfloat16) is the largest thing held.",
    ]))


if __name__ == "__main__":
    main()
