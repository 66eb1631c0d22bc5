"""extend-text throughput on CPU: tokens/s and peak memory against sequence length, 1 vs 2 processes.

A tiny-but-wide random Qwen2 (hidden 512, 8 heads / 2 KV heads, 2 layers) trains a few steps
on synthetic tokens with the tiny-cpu recipe. "1 proc" is one process using all cores; "2 proc"
is torchrun with two gloo processes sharing each sequence through DeepSpeed Ulysses (the
memory that matters per process is then roughly halved for the activations). Each run is a
fresh process: the first step (warm-up) is dropped and the median of the rest is reported.
Both must train the same: their losses agree to 1e-3 at every step, or the script exits non-zero.

    python benchmarks/extend_text_throughput.py                     # default lengths
    python benchmarks/extend_text_throughput.py --lengths 1024 4096 --steps 4 --no-write
    python benchmarks/extend_text_throughput.py --smoke             # one short length, a narrow model

Writes the table, the command, the machine and the date to benchmarks/RESULTS.md under
"## extend-text throughput" (--results: another file).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, check, command_line, parse_args, provenance, write_section

HEADING = "## extend-text throughput"
SMOKE = {"lengths": [64], "steps": 2, "hidden": 64}


def run(seq_len: int, procs: int, steps: int, hidden: int, out: Path) -> dict:
    from longva_cli.parallel.ranks import free_port

    overrides = [
        f"model.config.hidden_size={hidden}",
        f"model.config.intermediate_size={2 * hidden}",
        "model.config.num_attention_heads=8",
        "model.config.num_key_value_heads=2",
        "model.config.num_hidden_layers=2",
        f"data.cache_dir={out.parent / 'cache'}",
        f"data.seq_len={seq_len}",
        f"train.max_steps={steps}",
        f"train.save_every={10 * steps}",  # only the final checkpoint
        "train.micro_batch_size=1",
        "train.grad_accum=1",
        "parallel.zero_stage=2",
        f"parallel.sequence_parallel={procs}",
        f"train.output_dir={out}",
    ]
    launcher = [sys.executable, "-m", "longva_cli"]
    if procs > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-port", str(free_port()),
                    "-m", "longva_cli"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [*launcher, "extend-text", "--recipe", "extend-text/tiny-cpu", *overrides],
        env=env, capture_output=True, text=True,
    )
    if done.returncode:
        raise SystemExit(f"run failed (seq {seq_len}, {procs} proc):\n{done.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    check(len(records) == steps, f"{procs} proc at {seq_len} tokens logged {len(records)} of {steps} steps")
    timed = records[1:] or records
    figures = {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "peak_gb": max(r["peak_host_mem_gb"] for r in records),
        "losses": [r["loss"] for r in records],
    }
    for name in ("tokens_per_s", "peak_gb"):
        check(math.isfinite(figures[name]) and figures[name] > 0, f"{procs} proc at {seq_len} tokens: {name} is {figures[name]}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512, help="the model's width (8 heads, 2 KV heads)")
    parser.add_argument("--no-write", action="store_true", help="Print only; leave RESULTS.md alone.")
    args = parse_args(parser, SMOKE, records=True)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seq_len in args.lengths:
            one = run(seq_len, 1, args.steps, args.hidden, Path(tmp) / f"one-{seq_len}")
            two = run(seq_len, 2, args.steps, args.hidden, Path(tmp) / f"two-{seq_len}")
            check(all(abs(a - b) <= 1e-3 for a, b in zip(one["losses"], two["losses"], strict=True)),
                  f"1 and 2 processes train the same at {seq_len} tokens (losses {one['losses']} and {two['losses']})")
            rows.append((seq_len, one, two))
            print(f"seq {seq_len}: 1 proc {one}, 2 proc {two}", file=sys.stderr)

    table = [
        "| sequence length | 1 proc tok/s | 1 proc peak RSS (GB) | 2 proc tok/s | 2 proc peak RSS per proc (GB) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for seq_len, one, two in rows:
        table.append(
            f"| {seq_len:,} | {one['tokens_per_s']:,.0f} | {one['peak_gb']:.2f} | {two['tokens_per_s']:,.0f} | {two['peak_gb']:.2f} |"
        )
    print("\n".join(table))
    if args.no_write:
        return
    write_section(args.results, HEADING, "\n".join([
        f"Command: `{command_line()}` ({provenance()}, no GPU).",
        f"Model: random Qwen2, hidden {args.hidden}, 8 heads / 2 KV heads, 2 layers, vocab 512; fp32; ZeRO-2;",
        f"micro-batch 1, {args.steps} steps per run, first step dropped, median tokens/s of the rest.",
        "2 proc = torchrun, 2 gloo processes sharing each sequence via DeepSpeed Ulysses; the losses of both agree at every step (checked).",
        "Peak RSS includes the Python/torch/DeepSpeed baseline (~0.5-0.7 GB per process).",
        "",
        *table,
    ]))


if __name__ == "__main__":
    main()
