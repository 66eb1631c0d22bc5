"""Throughput and latency of `longva serve` under concurrent clients, native engine against vLLM's.

    python benchmarks/serve_load.py [--engine native|vllm|both] [--clients 1 4 16] [--requests 32]
                                    [--media video] [--frames 4] [--max-tokens 16] [--smoke]

For each engine, starts `python -m longva_cli serve --engine ENGINE` on the same tiny random
checkpoint (or --model) on a free loopback port, then for each client count runs that many
threads, each sending non-streaming chat completions back to back (`--requests` in all per
level, a video given as a file:// URL under --media-root). Reports requests per second, p50/p95
latency, generated tokens per second and the peak resident memory of the server and the engine
processes it started (VmHWM from /proc, summed, after each level); with both engines, vLLM's
req/s against the native engine's at each client count, measured in the same run.

The native engine answers one request at a time, so its throughput stays flat as clients grow
and latency grows with the queue; vLLM batches the requests it holds. `--engine vllm|both`
needs vLLM (run with `.venv-vllm/bin/python`, which has both engines); on a CPU, vLLM's CPU
build runs eager (`--vllm-args --enforce-eager`) with a 1 GiB KV cache unless
VLLM_CPU_KVCACHE_SPACE says otherwise. Every request must succeed and every level give finite
figures; the script exits non-zero otherwise. The table is printed and written under
`## serve load` in benchmarks/RESULTS.md (`--no-record` to skip, --results for another file).
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import ROOT, check, command_line, parse_args, provenance, ratio, write_section

HEADING = "## serve load"
SMOKE = {"clients": [1, 2], "requests": 2, "frames": 1, "max_tokens": 2}


def post(port: int, body: dict, timeout: float = 300) -> tuple[float, int]:
    """(seconds, completion tokens) of one chat completion; raises on a non-200 answer."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = json.loads(response.read())
    finally:
        connection.close()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {answer}")
    return time.perf_counter() - started, answer["usage"]["completion_tokens"]


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (vLLM's engine core and workers are children of the server)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            todo += [int(child) for child in task.read_text().split()]
    return found


def peak_memory_mib(pid: int) -> float:
    """Peak resident memory of the server and its child processes (shared pages counted in each)."""
    total = 0.0
    for member in process_tree(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:  # gone in between
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) / 1024
    return total


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run_level(port: int, clients: int, total: int, body: dict) -> dict:
    per_client = [total // clients + (1 if i < total % clients else 0) for i in range(clients)]

    def client(count: int) -> list[tuple[float, int]]:
        return [post(port, body) for _ in range(count)]

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = [r for batch in pool.map(client, per_client) for r in batch]
    wall = time.perf_counter() - started
    latencies = [seconds for seconds, _ in results]
    return {
        "clients": clients,
        "requests": len(results),
        "rps": len(results) / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p95_ms": 1000 * percentile(latencies, 0.95),
        "tokens_per_s": sum(tokens for _, tokens in results) / wall,
    }


def measure(engine: str, model: str, media_dir: Path, body: dict, args: argparse.Namespace) -> list[dict]:
    """Start a server on `engine`, warm it up, and run each client level against it."""
    from longva_cli.parallel.ranks import free_port

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    command = [sys.executable, "-m", "longva_cli", "serve", "--engine", engine, "--model", model, "--port", str(port),
               "--media-root", str(media_dir), "--max-queue", "1024", "--max-tokens-limit", str(max(args.max_tokens, 1)),
               "--max-frames", str(args.frames), "--log-level", "warning"]
    if engine == "vllm":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; without it vLLM's CPU build wants most of the machine
        command += ["--max-model-len", "8192", "--vllm-args", args.vllm_args]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                post(port, body)  # also the warm-up
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the {engine} server did not start") from None
                time.sleep(0.5)
        post(port, body)
        rows = []
        for clients in args.clients:
            row = run_level(port, clients, max(args.requests, clients), body)
            row["engine"] = engine
            row["peak_mib"] = peak_memory_mib(server.pid)
            for name in ("rps", "p50_ms", "p95_ms", "tokens_per_s", "peak_mib"):
                check(math.isfinite(row[name]) and row[name] > 0, f"{engine}, {clients} clients: {name} is {row[name]}")
            rows.append(row)
            print(f"{engine}, {clients} clients: {row['rps']:.1f} req/s", file=sys.stderr)
        return rows
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)


def vllm_version() -> str:
    from importlib import metadata

    for name in ("vllm", "vllm-cpu"):
        try:
            return f"{name} {metadata.version(name)}"
        except metadata.PackageNotFoundError:
            continue
    return "vllm"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["native", "vllm", "both"], default="native")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients per level")
    parser.add_argument("--requests", type=int, default=32, help="requests per level")
    parser.add_argument("--media", choices=["video", "image", "text"], default="video")
    parser.add_argument("--frames", type=int, default=4, help="video frames per request (144 tokens each)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--model", help="checkpoint to serve (default: a tiny random one with 64-wide heads, which vLLM's CPU attention needs)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for the servers (1 suits the tiny model)")
    parser.add_argument("--vllm-args", default="--enforce-eager", help="--vllm-args of the vLLM server (default: eager, as on a CPU)")
    parser.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone")
    args = parse_args(parser, SMOKE, records=True)
    sys.path.insert(0, str(ROOT / "tests"))
    from support.media import write_image, write_video

    engines = ["native", "vllm"] if args.engine == "both" else [args.engine]
    with tempfile.TemporaryDirectory(prefix="longva-serve-bench-") as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            from longva_cli.model.tiny import write_tiny_checkpoint

            model = str(write_tiny_checkpoint(tmp / "tiny", hidden_size=256))  # 4 heads of 64
        media_dir = tmp / "media"
        media_dir.mkdir()
        video = write_video(media_dir / "clip.mp4", frames=60, width=320, height=180)
        image = write_image(media_dir / "photo.png", 640, 360)
        parts = {"video": [{"type": "video_url", "video_url": {"url": f"file://{video}"}}],
                 "image": [{"type": "image_url", "image_url": {"url": f"file://{image}"}}], "text": []}[args.media]
        body = {"messages": [{"role": "user", "content": parts + [{"type": "text", "text": "What happens?"}]}],
                "max_tokens": args.max_tokens, "temperature": 0, "video": {"frames": args.frames}}
        rows = [row for engine in engines for row in measure(engine, model, media_dir, body, args)]

    native = {row["clients"]: row["rps"] for row in rows if row["engine"] == "native"}
    header = (
        "| engine | clients | requests | req/s | vs native | p50 ms | p95 ms | gen tok/s | peak RSS MiB (server + engine processes) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = []
    for r in rows:
        versus = f"{ratio(r['rps'], native[r['clients']], r['engine'] + ' / native req/s'):.2f}x" if r["clients"] in native else "-"
        lines.append(f"| {r['engine']} | {r['clients']} | {r['requests']} | {r['rps']:.2f} | {versus} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} "
                     f"| {r['tokens_per_s']:.1f} | {r['peak_mib']:.0f} |")
    table = "\n".join([header, *lines])
    print(table)
    if not args.no_record:
        notes = (
            f"{provenance()}, no GPU (other jobs share the machine). "
            f"Model: {'tiny random checkpoint (hidden 256, 4 heads of 64)' if args.model is None else args.model}; {args.media}"
            f"{f' ({args.frames} frames = {args.frames * 144} visual tokens)' if args.media == 'video' else ''}, "
            f"max_tokens {args.max_tokens}, greedy, non-streaming, servers' OMP_NUM_THREADS={args.threads}. "
            "The native engine answers one request at a time: its req/s is flat in the client count and latency grows with the queue. "
            + (f"vLLM ({vllm_version()}, --vllm-args {args.vllm_args!r}, VLLM_CPU_KVCACHE_SPACE={os.environ.get('VLLM_CPU_KVCACHE_SPACE', '1')} GiB) "
               "batches the requests it holds; each engine step has a fixed cost (its engine core and worker are processes of their own, "
               "here on the same cores), which one request at a time does not amortise. vLLM's CPU build on a tiny model is not representative of GPU serving: these "
               "figures show batching at work end to end through `longva serve`, not what a GPU gives." if "vllm" in engines else "")
        )
        write_section(args.results, HEADING, f"{notes}\n\n```\n{command_line()}\n```\n\n{table}")


if __name__ == "__main__":
    main()
