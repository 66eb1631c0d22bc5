"""extend-text throughput on CPU: tokens/s and peak memory against sequence length, 1 vs 2 processes.

A tiny-but-wide random Qwen2 (hidden 512, 8 heads / 2 KV heads, 2 layers) trains a few steps
on synthetic tokens with the tiny-cpu recipe. "1 proc" is one process using all cores; "2 proc"
is torchrun with two gloo processes sharing each sequence through DeepSpeed Ulysses (the
memory that matters per process is then roughly halved for the activations). Each run is a
fresh process: the first step (warm-up) is dropped and the median of the rest is reported.

    python benchmarks/extend_text_throughput.py                     # default lengths
    python benchmarks/extend_text_throughput.py --lengths 1024 4096 --steps 4 --no-write

Appends the table and the command to benchmarks/RESULTS.md under "## extend-text throughput".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "RESULTS.md"
HEADING = "## extend-text throughput"
WIDE = [
    "model.config.hidden_size=512",
    "model.config.intermediate_size=1024",
    "model.config.num_attention_heads=8",
    "model.config.num_key_value_heads=2",
    "model.config.num_hidden_layers=2",
]


def run(seq_len: int, procs: int, steps: int, out: Path) -> dict:
    overrides = [
        *WIDE,
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
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "-m", "longva_cli"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [*launcher, "extend-text", "--recipe", "extend-text/tiny-cpu", *overrides],
        env=env, capture_output=True, text=True,
    )
    if done.returncode:
        raise SystemExit(f"run failed (seq {seq_len}, {procs} proc):\n{done.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = records[1:] or records
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "peak_gb": max(r["peak_host_mem_gb"] for r in records),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--no-write", action="store_true", help="Print only; leave RESULTS.md alone.")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seq_len in args.lengths:
            one = run(seq_len, 1, args.steps, Path(tmp) / f"one-{seq_len}")
            two = run(seq_len, 2, args.steps, Path(tmp) / f"two-{seq_len}")
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
    command = "python benchmarks/extend_text_throughput.py " + " ".join(sys.argv[1:])
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"
    import torch

    section = "\n".join(
        [
            HEADING,
            "",
            f"Command: `{command.strip()}` ({machine}, torch {torch.__version__}, no GPU).",
            "Model: random Qwen2, hidden 512, 8 heads / 2 KV heads, 2 layers, vocab 512; fp32; ZeRO-2;",
            f"micro-batch 1, {args.steps} steps per run, first step dropped, median tokens/s of the rest.",
            "2 proc = torchrun, 2 gloo processes sharing each sequence via DeepSpeed Ulysses.",
            "Peak RSS includes the Python/torch/DeepSpeed baseline (~0.5-0.7 GB per process).",
            "",
            *table,
            "",
        ]
    )
    write_section(section)
    print(f"wrote {RESULTS.relative_to(REPO)} ({HEADING})", file=sys.stderr)


def write_section(section: str) -> None:
    """Replace our section of RESULTS.md (or append it), leaving other sections untouched."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    if HEADING in text:
        before, _, rest = text.partition(HEADING)
        following = rest.find("\n## ")
        after = rest[following + 1 :] if following >= 0 else ""
        text = before + section + ("\n" + after if after else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
