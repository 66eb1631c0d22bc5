"""Peak memory and speed of `longva eval ppl` against the naive full-logits forward, per context length.

    python benchmarks/ppl_memory.py [--lengths 4096 8192 32768 131072] [--hidden 256] [--naive-limit-gb 14] [--smoke]

A tiny-but-wide Qwen2 (hidden 256, 2 layers, Qwen2's real 152,064-token vocabulary, float32 on
CPU) scores one document of exactly L tokens in one window. Each measurement runs in its own
process and reports its peak resident memory (ru_maxrss):

- ppl: `evaluate_perplexity` as `longva eval ppl` runs it: chunked prefill into the KV cache,
  log-probabilities 512 rows of logits at a time.
- naive: what perplexity scripts do: `model(input_ids, labels=input_ids)`, whose logits hold
  every position's whole vocabulary (L x 152,064 float32) before the loss is taken.

The naive forward is skipped where its logits alone would pass --naive-limit-gb; both print
the perplexity they measured, which must agree (to 1e-4, relative; the script exits non-zero
otherwise).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

from common import check, parse_args, ratio, run_json

VOCAB = 152_064
SMOKE = {"lengths": [256], "hidden": 64, "vocab": 512}


def measure(mode: str, model: Path, data: Path, length: int) -> dict:
    import torch

    started = time.perf_counter()
    if mode == "ppl":
        from longva_cli.eval.ppl import PplSettings, evaluate_perplexity

        work = Path(tempfile.mkdtemp(prefix="longva-ppl-bench-"))
        run = evaluate_perplexity(
            PplSettings(models=[str(model)], data=str(data), output=work / "run", min_tokens=length, max_tokens=length, device="cpu",
                        cache_dir=work / "cache")
        )
        record = run.records[0]
        perplexity, scored, seconds = record["perplexity"], record["tokens_scored"], record["seconds"]
        assert record["windows"] == 1, record
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        ids = AutoTokenizer.from_pretrained(model)(data.read_text(), add_special_tokens=False, return_tensors="pt").input_ids
        network = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="sdpa").eval()
        scoring = time.perf_counter()
        with torch.inference_mode():
            loss = network(input_ids=ids, labels=ids).loss
        perplexity, scored, seconds = math.exp(float(loss)), ids.shape[1] - 1, time.perf_counter() - scoring
    return {
        "mode": mode,
        "tokens": length,
        "perplexity": perplexity,
        "scored": scored,
        "seconds": round(seconds, 1),
        "tokens_per_s": round(length / seconds),
        "wall_s": round(time.perf_counter() - started, 1),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def document_of(tokenizer, length: int, folder: Path) -> Path:
    """A .txt file whose text is exactly `length` tokens (cut from a synthetic book, re-tokenized to check)."""
    from longva_cli.niah.text import synthetic_haystack

    ids = tokenizer(synthetic_haystack(seed=length, sentences=length // 20), add_special_tokens=False).input_ids
    for end in range(length, len(ids)):
        text = tokenizer.decode(ids[:end])
        if len(tokenizer(text, add_special_tokens=False).input_ids) == length:
            path = folder / f"doc-{length}" / "doc.txt"
            path.parent.mkdir(parents=True)
            path.write_text(text)
            return path
    raise RuntimeError(f"no cut of the synthetic book is exactly {length} tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 32768, 131072])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--naive-limit-gb", type=float, default=14.0)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parse_args(parser, SMOKE)
    if args.child:
        mode, model, data, length = args.child
        print(json.dumps(measure(mode, Path(model), Path(data), int(length))))
        return

    import torch
    from transformers import Qwen2ForCausalLM

    from longva_cli.model.tiny import build_tiny_tokenizer, save_tiny_tokenizer, tiny_configs

    work = Path(tempfile.mkdtemp(prefix="longva-bench-"))
    model = work / "wide"
    torch.manual_seed(0)
    Qwen2ForCausalLM(tiny_configs(hidden_size=args.hidden, vocab_size=args.vocab)[0]).save_pretrained(model)
    tokenizer = build_tiny_tokenizer()
    save_tiny_tokenizer(tokenizer, model)
    print(f"model: Qwen2, hidden {args.hidden}, 2 layers, vocab {args.vocab:,}, float32 on CPU; one window of L tokens")
    print(f"{'L':>7} {'ppl MB':>8} {'tok/s':>7} {'naive MB':>9} {'tok/s':>7} {'naive/ppl MB':>12} {'perplexity (ppl, naive)':>26}")
    for length in args.lengths:
        data = document_of(tokenizer, length, work)
        rows = {}
        for mode in ("ppl", "naive"):
            logits_gb = length * args.vocab * 4 / 2**30
            if mode == "naive" and logits_gb > args.naive_limit_gb:
                continue
            rows[mode] = run_json([sys.executable, __file__, "--child", mode, str(model), str(data), str(length)])
        ours, naive = rows["ppl"], rows.get("naive")
        check(math.isfinite(ours["perplexity"]), f"the perplexity at {length} tokens is finite, not {ours['perplexity']}")
        if naive:
            check(math.isclose(ours["perplexity"], naive["perplexity"], rel_tol=1e-4),
                  f"both ways measure the same perplexity at {length} tokens ({ours['perplexity']} and {naive['perplexity']})")
            memory = ratio(naive["peak_rss_mb"], ours["peak_rss_mb"], "naive / ppl peak memory")
            tail = (f"{naive['peak_rss_mb']:9.0f} {naive['tokens_per_s']:7d} {memory:11.1f}x"
                    f" {ours['perplexity']:12.3f}, {naive['perplexity']:.3f}")
        else:
            tail = f"{'skipped':>9} {'':>7} {f'(logits {logits_gb:.0f} GB)':>12} {ours['perplexity']:12.3f}"
        print(f"{length:7d} {ours['peak_rss_mb']:8.0f} {ours['tokens_per_s']:7d} {tail}", flush=True)


if __name__ == "__main__":
    main()
