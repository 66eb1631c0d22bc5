"""Training stage: `longva extend-text` steps at 32K tokens on one GPU (DeepSpeed ZeRO-2).

    python benchmarks/gpu/train.py --results OUT/gpu-results.json --work DIR            # GPU
    python benchmarks/gpu/train.py --results OUT/gpu-results.json --work DIR --tiny     # CPU dry run

Runs the command-line tool itself with dotted overrides of the bundled `extend-text/tiny-cpu`
recipe (random weights, synthetic tokens, nothing to download): on a GPU a Qwen2-0.5B-shaped
model (24 layers, hidden 896, 14 heads / 2 KV heads, MLP 4864, vocab 151,936) in bf16 with
gradient checkpointing, 32,768-token sequences; in the dry run the recipe's own tiny model.
Figures come from the run's `metrics.jsonl`: tokens/s per step (the first step, which warms
up, is reported apart) and peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import record

QWEN2_05B = {
    "vocab_size": 151_936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
    "num_attention_heads": 14, "num_key_value_heads": 2, "tie_word_embeddings": "true",
}


def overrides(tiny: bool, work: Path, seq_len: int) -> list[str]:
    common = [f"data.seq_len={seq_len}",
        f"train.output_dir={work / 'extend-text'}", f"data.cache_dir={work / 'cache'}", "train.grad_accum=1",
        "train.micro_batch_size=1", "parallel.zero_stage=2", "parallel.sequence_parallel=1",
    ]
    if tiny:
        return common + ["train.max_steps=3", "train.save_every=3"]
    model = [f"model.config.{key}={value}" for key, value in QWEN2_05B.items()]
    return common + model + [
        "train.max_steps=4", "train.save_every=4", "data.synthetic_rows=8",
        "train.precision=bf16", "train.gradient_checkpointing=true", "train.loss_chunk=4096", "optimizer.lr=1e-5",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="the recipe's tiny model on the CPU (the suite's dry run)")
    args = parser.parse_args()
    seq_len = 256 if args.tiny else 32_768
    settings = overrides(args.tiny, args.work, seq_len)
    command = [sys.executable, "-m", "longva_cli", "extend-text", "--recipe", "extend-text/tiny-cpu", *settings]
    record.update(args.results, "stages.train", {"command": " ".join(command[1:]), "model": "tiny-cpu recipe" if args.tiny else "Qwen2-0.5B shape, random"})
    started = time.time()
    child = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        returncode = child.wait()
    except KeyboardInterrupt:  # the stage's time limit: the child got SIGINT too; record what it measured
        returncode = child.wait()
    ended = time.time()
    metrics = args.work / "extend-text" / "metrics.jsonl"
    steps = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.is_file() else []
    figures = {"exit_code": returncode, "wall_s": round(ended - started, 1), "steps": len(steps)}
    if steps:
        # where the wall time went: start-up (imports, model, DeepSpeed), steps, last checkpoint, exit
        latest = args.work / "extend-text" / "latest"
        saved = latest.lstat().st_mtime if latest.exists() or latest.is_symlink() else None
        figures["phases_s"] = {
            "startup": round(steps[0]["time"] - steps[0]["step_time_s"] - started, 1),
            "steps": round(sum(step["step_time_s"] for step in steps), 1),
            "last_checkpoint": None if saved is None else round(saved - steps[-1]["time"], 1),
            "exit": round(ended - (saved or steps[-1]["time"]), 1),
        }
        rates = [step["tokens_per_s"] for step in steps]
        figures.update(
            sequence_tokens=seq_len,
            first_step_tokens_per_s=rates[0],
            tokens_per_s=statistics.median(rates[1:]) if len(rates) > 1 else rates[0],
            step_time_s=[step["step_time_s"] for step in steps],
            losses=[step["loss"] for step in steps],
            peak_gpu_mem_gb=steps[-1].get("peak_gpu_mem_gb"),
            peak_host_mem_gb=steps[-1].get("peak_host_mem_gb"),
        )
    record.update(args.results, "stages.train", figures)
    print(f"train: {figures}", flush=True)
    sys.exit(returncode)


if __name__ == "__main__":
    main()
