"""What encoding once and asking many saves: serve follow-ups, several questions, the disk cache.

    python benchmarks/engine_reuse.py [--frames 64] [--hidden 512] [--max-tokens 8] [--questions 4] [--no-record] [--smoke]

A tiny-but-wide LongVA (2 layers, hidden --hidden, Qwen2's real 152,064-token vocabulary) and a
generated 320x240 video, on the CPU. Three measurements, each against the way without reuse,
in the same run:

1. serve follow-up: `longva serve`, a first request about the video, then a second request
   about the same video with a new question (its embeddings and KV prefix are kept), and the
   same second request to a server started with `--cache-gb 0` (nothing kept): wall times.
2. `longva ask VIDEO Q1 Q2 Q3 Q4` (one process, the video encoded and prefilled once) against
   four separate `longva ask VIDEO Qi --no-cache` runs (--questions: how many): total wall time.
3. a second `longva ask` on the same video with the disk cache against the first (which
   decodes, encodes and writes the cache): wall time and the `encode_s` each reports.

Wall times include process start-up and model loading, as a user sees them. Both sides of each
row must give the same answers, and the follow-up must reuse cached prompt tokens; the script
exits non-zero otherwise. The table is printed and written under `## engine reuse` in
benchmarks/RESULTS.md (`--no-record` to skip, --results for another file).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, check, command_line, parse_args, provenance, ratio, write_section

HEADING = "## engine reuse"
VOCAB = 152_064
QUESTIONS = ["What happens?", "What colour is the square?", "Where does the square go?", "How does it end?"]
SMOKE = {"frames": 2, "hidden": 64, "vocab": 512, "max_tokens": 2, "questions": 2}


def longva(*args: str, env: dict) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "longva_cli", *args], capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"longva {' '.join(args)} failed: {done.stderr[-2000:]}")
    return time.perf_counter() - started, done


def start_server(checkpoint: Path, media: Path, port: int, env: dict, *flags: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "longva_cli", "serve", "--model", str(checkpoint), "--port", str(port), "--device", "cpu",
               "--media-root", str(media), "--max-frames", "4096", "--log-level", "warning", *flags]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError(f"the server did not start: {server.stderr.read()[-2000:]}")


def chat(port: int, video: Path, question: str, frames: int, max_tokens: int) -> tuple[float, dict]:
    body = {
        "model": "longva", "temperature": 0, "max_tokens": max_tokens, "video": {"frames": frames},
        "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"file://{video}"}},
                                                  {"type": "text", "text": question}]}],
    }
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    connection.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    answer = json.loads(connection.getresponse().read())
    if "usage" not in answer:
        raise RuntimeError(f"the server answered {answer}")
    return time.perf_counter() - started, answer


def serve_follow_up(checkpoint: Path, video: Path, args, env: dict) -> dict:
    from longva_cli.parallel.ranks import free_port

    port = free_port()
    server = start_server(checkpoint, video.parent, port, env)
    try:
        first_s, first = chat(port, video, QUESTIONS[0], args.frames, args.max_tokens)
        second_s, second = chat(port, video, QUESTIONS[1], args.frames, args.max_tokens)
    finally:
        server.terminate()
        server.wait(60)
    port = free_port()
    cold_server = start_server(checkpoint, video.parent, port, env, "--cache-gb", "0")
    try:
        chat(port, video, QUESTIONS[0], args.frames, args.max_tokens)
        cold_s, cold = chat(port, video, QUESTIONS[1], args.frames, args.max_tokens)
    finally:
        cold_server.terminate()
        cold_server.wait(60)
    check(second["choices"][0]["message"]["content"] == cold["choices"][0]["message"]["content"],
          "a follow-up answers as it does on a server that keeps nothing")
    check(second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0, "the follow-up reuses the first request's prompt tokens")
    return {
        "first_s": first_s, "second_s": second_s, "cold_second_s": cold_s,
        "prompt_tokens": second["usage"]["prompt_tokens"], "cached_tokens": second["usage"]["prompt_tokens_details"]["cached_tokens"],
    }


def ask_questions(checkpoint: Path, video: Path, args, env: dict) -> dict:
    common = ("--model", str(checkpoint), "--device", "cpu", "-t", "0", "--max-new-tokens", str(args.max_tokens), "--frames", str(args.frames), "--json")
    questions = QUESTIONS[: args.questions]
    together_s, together = longva("ask", str(video), *questions, "--no-cache", *common, env=env)
    separate_s, answers = 0.0, []
    for question in questions:
        seconds, done = longva("ask", str(video), question, "--no-cache", *common, env=env)
        separate_s += seconds
        answers.append(json.loads(done.stdout)["answer"])
    check([json.loads(line)["answer"] for line in together.stdout.splitlines()] == answers,
          "several questions in one ask answer as separate runs do")
    return {"together_s": together_s, "separate_s": separate_s}


def disk_cache(checkpoint: Path, video: Path, args, env: dict) -> dict:
    cache = Path(tempfile.mkdtemp(prefix="longva-cache-"))
    common = ("--model", str(checkpoint), "--device", "cpu", "-t", "0", "--max-new-tokens", str(args.max_tokens), "--frames", str(args.frames),
              "--json", "--cache-dir", str(cache))
    first_s, first = longva("ask", str(video), QUESTIONS[0], *common, env=env)
    second_s, second = longva("ask", str(video), QUESTIONS[0], *common, env=env)
    one, two = json.loads(first.stdout), json.loads(second.stdout)
    check(one["answer"] == two["answer"], "the answer from the disk cache is the first answer")
    return {"first_s": first_s, "second_s": second_s, "first_encode_s": one["timings"]["encode_s"], "second_encode_s": two["timings"]["encode_s"]}


def table(args, serve: dict, ask: dict, cache: dict) -> str:
    def row(measure: str, with_reuse: float, without: float) -> str:
        return f"| {measure} | {with_reuse:.2f} | {without:.2f} | {ratio(without, with_reuse, measure):.1f}x |"

    count = args.questions
    return "\n".join([
        f"Command: `{command_line()}` ({provenance()}, no GPU). Tiny-but-wide LongVA: hidden "
        f"{args.hidden}, 2 layers, vocabulary {args.vocab:,}; a {args.frames}-frame 320x240 video ({args.frames * 144:,} visual tokens); "
        f"greedy answers of at most {args.max_tokens} tokens, identical on both sides of every row (checked).",
        "",
        "| measure | with reuse (s) | without (s) | without / with |",
        "|---|---:|---:|---:|",
        row("serve: second request, same video, new question (vs a server with `--cache-gb 0`)", serve["second_s"], serve["cold_second_s"]),
        row("serve: second request against the first request (which decoded, encoded and prefilled)", serve["second_s"], serve["first_s"]),
        row(f"`ask` with {count} questions vs {count} separate `ask --no-cache` runs", ask["together_s"], ask["separate_s"]),
        row("second `ask` on the same video (disk cache) vs the first", cache["second_s"], cache["first_s"]),
        f"| `encode_s` reported by those two `ask` runs | {cache['second_encode_s']:.2f} | {cache['first_encode_s']:.2f} | |",
        "",
        f"The follow-up request reused {serve['cached_tokens']:,} of its {serve['prompt_tokens']:,} prompt tokens "
        "(`usage.prompt_tokens_details.cached_tokens`).",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--questions", type=int, choices=range(1, len(QUESTIONS) + 1), default=len(QUESTIONS),
                        help="how many questions one ask takes, against as many runs")
    parser.add_argument("--no-record", action="store_true")
    args = parse_args(parser, SMOKE, records=True)

    sys.path.insert(0, str(ROOT / "tests"))
    from support.media import write_video

    from longva_cli.model.tiny import write_tiny_checkpoint

    work = Path(tempfile.mkdtemp(prefix="longva-reuse-"))
    checkpoint = write_tiny_checkpoint(work / "wide", hidden_size=args.hidden, vocab_size=args.vocab, max_shard_size="100MB")
    (work / "media").mkdir()
    video = write_video(work / "media" / "clip.mp4", frames=args.frames * 2, width=320, height=240, fps=25)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(work / "xdg")}
    serve = serve_follow_up(checkpoint, video, args, env)
    print(f"serve: first {serve['first_s']:.2f}s, follow-up {serve['second_s']:.2f}s, follow-up without reuse {serve['cold_second_s']:.2f}s", flush=True)
    ask = ask_questions(checkpoint, video, args, env)
    print(f"ask: {args.questions} questions in one run {ask['together_s']:.2f}s, {args.questions} runs {ask['separate_s']:.2f}s", flush=True)
    cache = disk_cache(checkpoint, video, args, env)
    text = table(args, serve, ask, cache)
    print(text)
    if not args.no_record:
        write_section(args.results, HEADING, text)


if __name__ == "__main__":
    main()
