"""`longva serve` against values and clients that used to crash it or starve others (issues 26
and 27): underflowing sampling values, lone surrogates, every numeric field, a tenant reading
another's prompt through `cached_tokens`, videos whose header probe decoded frames, clients that
send a byte at a time, numeric flags of `serve` itself, and a fuzz run of random bodies. Each
test sends exactly the input that was reported, to a real server on a loopback port, or checks
the request parser in process where the point is the parser."""

from __future__ import annotations

import json
import random
import re
import socket
import string
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'longva[serve]'")
pytest.importorskip("uvicorn", reason="needs the serve extra: pip install 'longva[serve]'")

from support.media import write_blank_video, write_image, write_video  # noqa: E402
from support.server import HOST, Server, data_url, health, media_part, request, text, user, wait_until  # noqa: E402

from longva_cli.serve.openai_format import APIError, RequestLimits, parse_chat_body  # noqa: E402

CHAT = "/v1/chat/completions"
KEYS = {"alice": "key-of-alice", "bob": "key-of-bob"}
READ_TIMEOUT_S = 3
MAX_QUEUE = 2
HUGE_SIDE = 7680  # frames beyond the 8K limit: a file of kilobytes that decodes to 88 MB a frame


@pytest.fixture(scope="module")
def media_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("media-root")
    write_video(root / "clip.mp4", frames=12)
    write_image(root / "photo.png", 96, 64)
    write_blank_video(root / "huge.mp4", HUGE_SIDE, HUGE_SIDE)
    return root


@pytest.fixture(scope="module")
def server(tiny_checkpoint, media_root, tmp_path_factory):
    """Two tenants (API keys), a short --read-timeout and a queue of two."""
    keys = [flag for key in KEYS.values() for flag in ("--api-key", key)]
    running = Server(
        tiny_checkpoint, tmp_path_factory.mktemp("server"), *keys, "--media-root", str(media_root),
        "--read-timeout", str(READ_TIMEOUT_S), "--max-queue", str(MAX_QUEUE), "--max-frames", "8", "--max-tokens-limit", "64",
    )
    yield running
    running.stop()


def as_tenant(name: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def post(server: Server, body: bytes | dict, tenant: str = "alice"):
    return request(server, "POST", CHAT, body, headers=as_tenant(tenant))


def no_traceback(server: Server) -> None:
    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]


# ---- 26.1: sampling values that underflow ---------------------------------------------------------


@pytest.mark.integration
def test_temperatures_and_top_p_that_underflow_decode_greedily(server):
    def answer(**sampling) -> str:
        status, body = post(server, {"messages": [user(text("Describe a sunset."))], "max_tokens": 6, **sampling})
        assert status == 200, (sampling, body)
        return body["choices"][0]["message"]["content"]

    greedy = answer(temperature=0)
    for sampling in ({"temperature": 1e-300}, {"temperature": 5e-324}, {"temperature": 1e-6, "seed": 3},
                     {"temperature": 1, "top_p": 1e-300}, {"temperature": 1e-300, "top_p": 1e-300}):
        assert answer(**sampling) == greedy, sampling
    no_traceback(server)


# ---- 26.2: lone surrogates ------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("surrogate", ["\ud800", "\udfff"])
def test_lone_surrogates_are_400s_naming_the_field_every_time(server, surrogate):
    cases = [
        ("messages[0].content", {"messages": [{"role": "user", "content": f"hi {surrogate}"}]}),
        ("messages[0].content[1].text", {"messages": [user(text("Look."), text(surrogate))]}),
        ("messages[0].content", {"messages": [{"role": "system", "content": surrogate}, user(text("hi"))]}),
        ("messages[0].content[0].image_url.url", {"messages": [user(media_part("image_url", f"file:///tmp/{surrogate}.png"))]}),
        ("model", {"model": surrogate, "messages": [user(text("hi"))]}),
        (None, {"messages": [user(text("hi"))], surrogate: 1}),
    ]
    for _ in range(3):  # the report: three 500s in a row
        for param, body in cases:
            raw = json.dumps({**body, "max_tokens": 1}).encode()  # ensure_ascii: the surrogate as a valid JSON escape
            assert b"\\ud" in raw
            status, answer = post(server, raw)
            assert (status, answer["error"]["param"]) == (400, param), answer
            assert "lone UTF-16 surrogate" in answer["error"]["message"]
    assert post(server, {"messages": [user(text("still there?"))], "max_tokens": 1})[0] == 200
    no_traceback(server)


# ---- 26.4: every numeric field through one validator, one test per kind of bad value --------------

NUMERIC_FIELDS = ["max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "n", "video.frames", "video.fps"]
WHOLE_FIELDS = {"max_tokens", "max_completion_tokens", "top_k", "seed", "n", "video.frames"}
BELOW_RANGE = {"max_tokens": 0, "max_completion_tokens": -1, "temperature": -0.01, "top_p": 0, "top_k": 0, "seed": -(2**63) - 1,
               "n": 0, "video.frames": 0, "video.fps": 0.0009}
ABOVE_RANGE = {"max_tokens": 2**63, "max_completion_tokens": 10**30, "temperature": 2.01, "top_p": 1.01, "top_k": 2**63,
               "seed": 2**63, "n": 2, "video.frames": 10**30}


def body_with(field: str, value) -> dict:
    body = {"messages": [user(text("hi"))]}
    if field.startswith("video."):
        body["video"] = {field.removeprefix("video."): value}
    else:
        body[field] = value
    return body


def refusal(raw: bytes) -> APIError:
    with pytest.raises(APIError) as refused:
        parse_chat_body(raw, RequestLimits(max_tokens=64), {"longva"}, "longva", Path("/nonexistent"))
    return refused.value


KINDS = {
    "a string": {field: "1" for field in NUMERIC_FIELDS},
    "a boolean": {field: True for field in NUMERIC_FIELDS},
    "a list": {field: [1] for field in NUMERIC_FIELDS},
    "an object": {field: {"value": 1} for field in NUMERIC_FIELDS},
    "a fraction where a whole number belongs": {field: 1.5 for field in WHOLE_FIELDS},
    "below the range": BELOW_RANGE,
    "above the range": ABOVE_RANGE,
}


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_of_bad_number_is_a_400_naming_the_field(kind):
    for field, value in KINDS[kind].items():
        error = refusal(json.dumps(body_with(field, value)).encode())
        assert (error.status, error.param) == (400, field), (field, value, error.message)
        assert error.message.startswith(f"{field} must be a {'whole' if field in WHOLE_FIELDS else 'finite'} number"), error.message


def test_numbers_json_cannot_hold_are_400s():
    # 1e400 parses as infinity; NaN and Infinity are not JSON at all.
    for field in ("temperature", "top_p", "video.fps", "max_tokens", "seed"):
        raw = json.dumps(body_with(field, 12345)).replace("12345", "1e400").encode()
        error = refusal(raw)
        assert (error.status, error.param) == (400, field) and "got inf" in error.message, error.message
    for literal in (b"NaN", b"Infinity", b"-Infinity"):
        error = refusal(b'{"messages": [{"role": "user", "content": "hi"}], "temperature": ' + literal + b"}")
        assert error.status == 400 and "not JSON" in error.message


def test_a_long_bad_value_is_not_echoed_back_whole():
    error = refusal(json.dumps(body_with("temperature", "hot" * 1_000_000)).encode())
    assert error.param == "temperature" and len(error.message) < 300


# ---- 27.3: one tenant's prompt is not readable by another -----------------------------------------


def cached(answer: dict) -> int:
    return answer["usage"]["prompt_tokens_details"]["cached_tokens"]


@pytest.mark.integration
def test_one_tenant_cannot_read_anothers_prompt_through_cached_tokens(server):
    document = "Minutes of the facilities meeting. " * 12 + "The door code is "
    secret = "48"
    ask = lambda tenant, content: post(server, {"messages": [user(text(content))], "max_tokens": 1, "temperature": 0}, tenant)  # noqa: E731
    status, victim = ask("alice", document + secret + ". Keep it safe.")
    assert status == 200, victim
    # The attack: share the document, guess the next digit, one request a guess; the guess that
    # matches would reuse one token more. Bob's own first request primes his cache with the prefix,
    # so every guess reuses the same of his own.
    for position in range(len(secret)):
        known = document + secret[:position]
        assert ask("bob", known)[0] == 200
        seen = {digit: cached(ask("bob", known + digit)[1]) for digit in "0123456789"}
        assert len(set(seen.values())) == 1, seen  # the right digit looks like every other
    # Within one tenant, a follow-up still reuses the conversation (in whole blocks of 16).
    status, follow_up = post(server, {"messages": [user(text(document + secret + ". Keep it safe.")),
                                                   {"role": "assistant", "content": victim["choices"][0]["message"]["content"] or "."},
                                                   user(text("Which code?"))], "max_tokens": 1})
    assert status == 200 and cached(follow_up) >= (victim["usage"]["prompt_tokens"] - 1) // 16 * 16 > 0
    assert cached(follow_up) % 16 == 0


@pytest.mark.integration
def test_a_video_another_tenant_sent_is_not_reused(server, media_root):
    body = {"messages": [user(media_part("video_url", f"file://{media_root}/clip.mp4"), text("What moves?"))],
            "max_tokens": 1, "temperature": 0, "video": {"frames": 3}}
    first = post(server, body, "alice")[1]
    again = post(server, body, "alice")[1]
    other = post(server, body, "bob")[1]
    assert cached(again) >= 3 * 144  # the same tenant: the whole prompt, video included, was kept
    assert cached(other) == 0  # another tenant starts cold
    assert other["choices"][0]["message"] == first["choices"][0]["message"]  # and gets the same answer


def test_runners_and_embeddings_are_reused_only_within_a_scope(tiny_longva, video_file, monkeypatch):
    from longva_cli.engine import MediaSpec, RunnerPool, VisualCache, build, drive, encode, encoder, prompt_parts
    from longva_cli.model.prompt import Turn, chat_prompt
    from longva_cli.serve.native import TenantCache

    shared = VisualCache(memory_bytes=2**30)
    decoded = []
    real_pixels = encoder.pixels
    monkeypatch.setattr(encoder, "pixels", lambda *args: decoded.append(1) or real_pixels(*args))
    spec = MediaSpec(video_file, 2, None)
    visual = drive(encode(tiny_longva, spec, TenantCache(shared, "alice")))
    drive(encode(tiny_longva, spec, TenantCache(shared, "alice")))
    assert len(decoded) == 1  # alice's second request reads her embeddings
    drive(encode(tiny_longva, spec, TenantCache(shared, "bob")))
    assert len(decoded) == 2  # bob's is decoded and encoded again, as on a cold server

    pool = RunnerPool(tiny_longva.model.language_model, budget_bytes=2**30)
    sequence = build(tiny_longva, prompt_parts(chat_prompt([Turn("user", "<image>\nWhat moves?")]), [visual]))
    runner = pool.acquire(sequence, scope="alice")
    list(runner.chunks(sequence, len(sequence), len(sequence) - 1))
    assert pool.acquire(sequence, scope="alice").shared_with(sequence) == len(sequence)
    assert pool.acquire(sequence, scope="bob").shared_with(sequence) == 0


# ---- 27.5: video headers are probed without decoding ----------------------------------------------


def peak_memory(server: Server) -> int:
    """The server process's peak resident memory (VmHWM), in bytes."""
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) * 1024


@pytest.mark.integration
def test_video_headers_are_probed_without_decoding_a_frame(server, media_root):
    huge = media_root / "huge.mp4"
    assert huge.stat().st_size < 200_000
    one_frame = HUGE_SIDE * HUGE_SIDE * 3 // 2  # a decoded yuv420p frame: 88 MB
    before = peak_memory(server)
    for _ in range(8):  # the report: eight small requests took the server from 389 to 3,909 MiB
        status, answer = post(server, {"messages": [user(media_part("video_url", f"file://{huge}"), text("What is it?"))],
                                       "max_tokens": 1, "video": {"fps": 1}})
        assert (status, answer["error"]["param"]) == (400, "messages[0].content[0].video_url.url"), answer
        assert f"{HUGE_SIDE} x {HUGE_SIDE} frames" in answer["error"]["message"] and str(huge) in answer["error"]["message"]
    assert peak_memory(server) - before < one_frame // 2
    assert health(server)["queued"] == 0  # refused while parsing: nothing was queued for the model
    no_traceback(server)


# ---- 27.6: slow clients -----------------------------------------------------------------------------


def trickle(sock: socket.socket, data: bytes, every_s: float, stop: threading.Event) -> None:
    """Send `data` one byte at a time, as the attack did, until the server hangs up or `stop`."""
    for byte in data:
        if stop.wait(every_s):
            return
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return


def read_status(sock: socket.socket) -> tuple[int, dict | None]:
    raw = b""
    while True:
        try:
            piece = sock.recv(65536)
        except OSError:
            break
        if not piece:
            break
        raw += piece
    if not raw:
        return 0, None  # closed without a word
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body) if body else None


@pytest.mark.integration
def test_slow_clients_hold_no_queue_place_and_are_cut_off(server):
    stop = threading.Event()
    key = KEYS["alice"]
    headers = (f"POST {CHAT} HTTP/1.1\r\nHost: {HOST}:{server.port}\r\nContent-Type: application/json\r\n"
               f"Authorization: Bearer {key}\r\nContent-Length: 200\r\n\r\n").encode()
    body_tricklers, threads = [], []
    for _ in range(2 * MAX_QUEUE):  # more slow bodies than the queue has places
        sock = socket.create_connection((HOST, server.port), timeout=60)
        sock.sendall(headers)
        body_tricklers.append(sock)
        threads.append(threading.Thread(target=trickle, args=(sock, b'{"messages": [' + b" " * 190, 0.5, stop)))
    header_trickler = socket.create_connection((HOST, server.port), timeout=60)
    threads.append(threading.Thread(target=trickle, args=(header_trickler, headers, 0.5, stop)))
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: health(server)["uploading"] == 2 * MAX_QUEUE, "the slow bodies were being received")
        assert health(server)["waiting"] == 0  # reading a body holds no place in the queue
        status, answer = post(server, {"messages": [user(text("Anyone there?"))], "max_tokens": 1})
        assert status == 200, answer  # before: 503 queue_full for as long as the trickle went on
        for sock in body_tricklers:
            status, answer = read_status(sock)
            assert (status, answer["error"]["code"]) == (408, "request_timeout"), answer
            assert "--read-timeout" in answer["error"]["message"]
        status, answer = read_status(header_trickler)
        assert (status, answer["error"]["code"]) == (408, "request_timeout"), answer
    finally:
        stop.set()
        for sock in [*body_tricklers, header_trickler]:
            sock.close()
        for thread in threads:
            thread.join()
    wait_until(lambda: health(server)["uploading"] == 0, "the cut-off uploads gave back their room")
    no_traceback(server)


# ---- 27.12: numeric flags of `serve` ----------------------------------------------------------------


@pytest.mark.parametrize(("flags", "sentence"), [
    (["--cache-gb", "inf"], "--cache-gb must be a finite number at least 0, got inf."),
    (["--max-request-mb", "inf"], "--max-request-mb must be a finite number above 0, got inf."),
    (["--max-request-mb", "nan"], "--max-request-mb must be a finite number above 0, got nan."),
    (["--queue-timeout", "nan"], "--queue-timeout must be a finite number above 0, got nan."),
    (["--read-timeout", "0"], "--read-timeout must be a finite number above 0, got 0.0."),
    (["--port", "70000"], "--port must be a whole number at least 1 and at most 65535, got 70000."),
    (["--max-queue", "0"], "--max-queue must be a whole number at least 1, got 0."),
    (["--engine", "vllm", "--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization must be a finite number above 0 and at most 1, got 1.5."),
])
def test_numeric_serve_flags_are_refused_at_start_in_one_sentence(flags, sentence, monkeypatch, capsys):
    from longva_cli.cli import main

    monkeypatch.setattr(sys, "argv", ["longva", "serve", "--model", "/nonexistent", *flags])
    with pytest.raises(SystemExit) as exited:
        main()
    err = capsys.readouterr().err
    assert exited.value.code == 1 and err.strip() == f"error: {sentence}", err


# ---- fuzz: a few hundred random bodies --------------------------------------------------------------


def fuzz_bodies(root: Path, count: int, seed: int = 2026):
    """`count` request bodies (bytes), from nearly right to nonsense; the same for a seed."""
    rng = random.Random(seed)
    image = data_url(root / "photo.png", "image/png")
    video = data_url(root / "clip.mp4", "video/mp4")
    odd_text = ["", "\ud800", "\udfff", "\x00", "<image>", "<video>", "\u202e\ufeff", "😀" * 50, "é" * 300, "a\nb\r\n", "%00"]

    def scalar():
        return rng.choice([
            0, 1, -1, 2, 2**63, -(2**63) - 1, 10**30, 1e-300, 5e-324, 1e308, -0.0, 0.5, 1.5, 3.0, True, False, None,
            rng.choice(odd_text), "".join(rng.choices(string.printable, k=rng.randint(0, 40))), rng.uniform(-5, 5),
        ])

    def value(depth: int = 0):
        roll = rng.random()
        if depth > 4 or roll < 0.6:
            return scalar()
        if roll < 0.8:
            return [value(depth + 1) for _ in range(rng.randint(0, 3))]
        return {rng.choice(["type", "text", "url", "frames", "fps", rng.choice(odd_text)]): value(depth + 1) for _ in range(rng.randint(0, 3))}

    def part():
        kind = rng.choice(["text", "text", "image_url", "video_url", "audio_url", 5])
        url = rng.choice([image, video, "file:///etc/passwd", f"file://{root}/photo.png", f"file://{root}/huge.mp4",
                          "https://example.com/x.png", "data:image/png;base64,@@", "data:,", value()])
        return rng.choice([
            {"type": kind, "text": rng.choice(["What is it?", *odd_text, value()])},
            {"type": kind, kind if isinstance(kind, str) else "x": {"url": url}},
            {"type": kind, kind if isinstance(kind, str) else "x": url},
            value(),
        ])

    def message():
        content = rng.choice([rng.choice(["Hello?", *odd_text]), [part() for _ in range(rng.randint(0, 3))], value()])
        return {"role": rng.choice(["user", "user", "user", "assistant", "system", "tool", value()]), "content": content}

    fields = ["max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "n", "stream", "stream_options",
              "stop", "tools", "video", "model", "messages", rng.choice(odd_text)]
    for _ in range(count):
        roll = rng.random()
        if roll < 0.05:
            yield bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
            continue
        if roll < 0.35:  # a plausible request, one field perhaps odd
            media = rng.choice([[], [media_part("image_url", image)], [media_part("video_url", video)]])
            body = {"messages": [user(*media, text(rng.choice(["What is it?", "Describe.", "é" * 30, "😀"])))], "max_tokens": rng.randint(1, 2)}
            if rng.random() < 0.5:
                body[rng.choice(fields[:8])] = scalar()
        else:
            body = {"messages": [message() for _ in range(rng.randint(1, 3))], "max_tokens": rng.randint(1, 2)}
            for _ in range(rng.randint(0, 4)):
                field = rng.choice(fields)
                body[field] = {"frames": value(), "fps": value()} if field == "video" and rng.random() < 0.5 else value()
        if rng.random() < 0.03:
            body["nested"] = json.loads("[" * 120 + "]" * 120)
        raw = json.dumps(body, allow_nan=True).encode()
        if roll > 0.97:
            raw = raw[: rng.randint(0, len(raw))]  # cut short
        yield raw


@pytest.mark.integration
def test_random_bodies_get_200_or_4xx_and_the_server_lives(tiny_checkpoint, media_root, tmp_path):
    fresh = Server(tiny_checkpoint, tmp_path, "--media-root", str(media_root), "--max-tokens-limit", "2", "--max-frames", "2",
                   "--max-prompt-tokens", "2000")
    try:
        statuses, wrong = {}, []
        for index, raw in enumerate(fuzz_bodies(media_root, 300)):
            status, answer = request(fresh, "POST", CHAT, raw)
            statuses[status] = statuses.get(status, 0) + 1
            streamed_error = isinstance(answer, bytes) and b'"server_error"' in answer
            if not (status == 200 or 400 <= status < 500) or streamed_error:
                wrong.append(f"body {index}: {status} {answer!r:.300} for {raw[:300]!r}")
        assert not wrong, "\n".join(wrong)
        assert statuses.get(200, 0) >= 20 and sum(n for s, n in statuses.items() if s >= 400) >= 100, statuses
        assert request(fresh, "GET", "/health")[0] == 200
        status, answer = request(fresh, "POST", CHAT, {"messages": [user(text("still there?"))]})
        assert status == 200, answer
    finally:
        fresh.stop()
    no_traceback(fresh)
