"""Milliseconds per decoded token against context length: transformers' DynamicCache against longva's KVCache.

    python benchmarks/decode_scaling.py [--contexts 4096 16384 65536] [--tokens 16] [--hidden 512] [--no-record] [--smoke]

`DynamicCache` appends each token's keys and values with `torch.cat`, so every decoded token
copies the whole cache; `KVCache` (longva_cli/model/kv_cache.py) writes them in place into
buffers reserved for the context plus the tokens to come. Per context length, a tiny-but-wide
Qwen2 decoder (2 layers, hidden --hidden, 8 KV heads, the mask-free SDPA longva runs) gets its
cache filled to that length with random keys and values (decoding's cost does not depend on
them, and a prefill of 64K tokens would take the CPU minutes), then decodes --tokens tokens
greedily, once per cache type, in this process. Reported: milliseconds per token, the ratio
DynamicCache / KVCache, and each run's peak memory above what the process held before it
(Linux peak RSS, reset before each run). Both caches must pick the same tokens and give the
same logits; the script exits non-zero otherwise. The table is printed and written under
`## decode scaling` in benchmarks/RESULTS.md (`--no-record` to skip, --results for another file).
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from common import check, command_line, parse_args, provenance, ratio, write_section
from longva_cli.model.attention import use_mask_free_attention
from longva_cli.model.compat import cache_kwargs
from longva_cli.model.kv_cache import KVCache

HEADING = "## decode scaling"
SMOKE = {"contexts": [256, 2048], "tokens": 4, "hidden": 64}


def build(hidden: int) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=1024, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=8, max_position_embeddings=1 << 20, rope_theta=1e6,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa").eval()
    use_mask_free_attention(model)
    return model


def fill(cache, config, context: int) -> None:
    """Put `context` positions of random keys and values into every layer of `cache`, in 4096-position pieces."""
    generator = torch.Generator().manual_seed(1)
    head_dim = config.hidden_size // config.num_attention_heads
    for start in range(0, context, 4096):
        size = min(4096, context - start)
        for layer in range(config.num_hidden_layers):
            keys, values = torch.randn(2, 1, config.num_key_value_heads, size, head_dim, generator=generator)
            cache.update(keys, values, layer)


def resident_kib() -> tuple[int, int]:
    """(current, peak) resident memory of this process, KiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def reset_peak() -> int:
    """Reset the process's peak RSS to its current RSS (Linux); returns the current RSS, KiB."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return resident_kib()[0]


@torch.inference_mode()
def decode(model, cache, tokens: int) -> tuple[list[int], torch.Tensor, float, float]:
    """Decode `tokens` tokens greedily after what `cache` holds: (ids, last logits, ms per token, peak MiB above the start)."""
    before = reset_peak()
    ids, token = [], torch.tensor([[1]])
    started = time.perf_counter()
    for _ in range(tokens):
        logits = model(input_ids=token, **cache_kwargs(cache)).logits[0, -1]
        token = logits.argmax().view(1, 1)
        ids.append(int(token))
    seconds = time.perf_counter() - started
    return ids, logits, 1000 * seconds / tokens, (resident_kib()[1] - before) / 1024


def measure(model, context: int, tokens: int) -> dict:
    config = model.config
    dynamic = DynamicCache(config=config)
    fill(dynamic, config, context)
    dynamic_ids, dynamic_logits, dynamic_ms, dynamic_mib = decode(model, dynamic, tokens)
    del dynamic
    preallocated = KVCache.for_model(config)
    preallocated.reserve(context + tokens)  # what the engine does: the prompt plus max_new_tokens
    fill(preallocated, config, context)
    ids, logits, ms, mib = decode(model, preallocated, tokens)
    del preallocated
    check(ids == dynamic_ids, f"at {context} positions both caches decode the same tokens ({ids} vs {dynamic_ids})")
    check(torch.allclose(logits, dynamic_logits, rtol=1e-4, atol=1e-4), f"at {context} positions both caches give the same logits")
    return {"context": context, "dynamic_ms": dynamic_ms, "ms": ms, "ratio": ratio(dynamic_ms, ms, "DynamicCache / KVCache time"),
            "dynamic_mib": dynamic_mib, "mib": mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536], help="cache lengths to decode after")
    parser.add_argument("--tokens", type=int, default=16, help="tokens decoded per cache and length")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size (8 heads, 8 KV heads)")
    parser.add_argument("--no-record", action="store_true", help="print the table only")
    args = parse_args(parser, SMOKE, records=True)
    model = build(args.hidden)
    rows = [measure(model, context, args.tokens) for context in args.contexts]
    kv_mib = 2 * 2 * args.hidden * 4 / 2**20  # per position: keys and values, 2 layers, float32
    lines = [
        f"{args.tokens} tokens decoded after each context; hidden {args.hidden}, 2 layers, 8 KV heads, float32 "
        f"({kv_mib * 1024:.0f} KiB of KV per position); CPU.",
        "",
        "| context (tokens) | DynamicCache ms/token | KVCache ms/token | DynamicCache / KVCache | DynamicCache peak MiB | KVCache peak MiB |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {row['context']:,} | {row['dynamic_ms']:.2f} | {row['ms']:.2f} | {row['ratio']:.2f}x | "
              f"{row['dynamic_mib']:.1f} | {row['mib']:.1f} |" for row in rows]
    first, last = rows[0], rows[-1]
    if len(rows) > 1:
        lines += ["", f"From {first['context']:,} to {last['context']:,} positions ({last['context'] / first['context']:.0f}x), a token "
                  f"costs {last['dynamic_ms'] / first['dynamic_ms']:.1f}x more with DynamicCache (it reads and copies the cache) "
                  f"and {last['ms'] / first['ms']:.1f}x more with KVCache (attention reading the cache once is what remains)."]
    print("\n".join(lines))
    if not args.no_record:
        write_section(args.results, HEADING, f"`{command_line()}` ({provenance()})\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
