"""Peak memory of `ask` against the number of frames, next to the KV cache and a naive forward.

    python benchmarks/ask_memory.py [--frames 64 128 256 512] [--hidden 256] [--naive-limit-gb 14] [--smoke]

A tiny-but-wide LongVA (hidden 256, 2 layers, Qwen2's real 152,064-token vocabulary) answers
one question about a generated video. Each measurement runs in its own process and reports
its peak resident memory (ru_maxrss):

- longva: `LongVA.ask` — frames encoded in batches, chunked prefill, last-position logits.
- naive: the original's path — one forward over the whole sequence returning logits for every
  position (float32 seq x vocab), as `generate` did before `logits_to_keep`.

The naive path is skipped where its logits alone would pass --naive-limit-gb. Where both run,
they must have built the same prompt; the script exits non-zero otherwise.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, check, parse_args, ratio, run_json

VOCAB = 152_064
SMOKE = {"frames": [2], "hidden": 64, "vocab": 512}


def measure(mode: str, checkpoint: Path, video: Path, frames: int) -> dict:
    import torch

    from longva_cli.engine import MediaSpec, build, drive, encode, prompt_parts
    from longva_cli.engine.memory import kv_cache_bytes
    from longva_cli import LongVA
    from longva_cli.model.prompt import question_prompt

    longva = LongVA.from_pretrained(str(checkpoint), device="cpu")
    started = time.perf_counter()
    if mode == "longva":
        answer = longva.ask(video, "What is moving?", frames=frames, temperature=0, max_new_tokens=1)
        tokens = answer.prompt_tokens
    else:
        visual = drive(encode(longva, MediaSpec(video, frames=frames)))
        sequence = build(longva, prompt_parts(question_prompt("What is moving?"), [visual]))
        embeds = sequence.embed(0, len(sequence))
        with torch.inference_mode():
            logits = longva.model.language_model(inputs_embeds=embeds[None]).logits.float()  # [1, seq, vocab]
        tokens = logits.shape[1]
    seconds = time.perf_counter() - started
    return {
        "mode": mode,
        "frames": frames,
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "kv_cache_mb": kv_cache_bytes(longva.model.config, tokens, longva.model.dtype) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--naive-limit-gb", type=float, default=14.0)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parse_args(parser, SMOKE)
    if args.child:
        mode, checkpoint, video, frames = args.child
        print(json.dumps(measure(mode, Path(checkpoint), Path(video), int(frames))))
        return

    sys.path.insert(0, str(ROOT / "tests"))
    from support.media import write_video

    from longva_cli.model.tiny import write_tiny_checkpoint

    work = Path(tempfile.mkdtemp(prefix="longva-bench-"))
    checkpoint = write_tiny_checkpoint(work / "wide", hidden_size=args.hidden, vocab_size=args.vocab, max_shard_size="50MB")
    video = write_video(work / "clip.mp4", frames=max(args.frames), width=320, height=240, fps=25)
    print(f"model: hidden {args.hidden}, 2 layers, vocab {args.vocab:,}; video 320x240, {max(args.frames)} frames")
    print(f"{'frames':>6} {'tokens':>8} {'KV MB':>8} {'longva MB':>10} {'s':>6} {'naive MB':>10} {'s':>6} {'naive/longva':>12}")
    for frames in args.frames:
        rows = {}
        tokens_estimate = frames * 144 + 40
        for mode in ("longva", "naive"):
            if mode == "naive" and tokens_estimate * args.vocab * 4 / 2**30 > args.naive_limit_gb:
                continue
            rows[mode] = run_json([sys.executable, __file__, "--child", mode, str(checkpoint), str(video), str(frames)])
        ours = rows["longva"]
        naive = rows.get("naive")
        if naive:
            check(naive["tokens"] == ours["tokens"], f"both ways build the same {frames}-frame prompt ({ours['tokens']} and {naive['tokens']} tokens)")
            memory = ratio(naive["peak_rss_mb"], ours["peak_rss_mb"], "naive / longva peak memory")
            tail = f"{naive['peak_rss_mb']:10.0f} {naive['seconds']:6.1f} {memory:11.1f}x"
        else:
            need = tokens_estimate * args.vocab * 4 / 2**30
            tail = f"{'skipped':>10} {'':>6} {f'(logits {need:.0f} GB)':>12}"
        print(f"{frames:6d} {ours['tokens']:8d} {ours['kv_cache_mb']:8.1f} {ours['peak_rss_mb']:10.0f} {ours['seconds']:6.1f} {tail}")


if __name__ == "__main__":
    main()
