"""`longva serve` against hostile and broken input: each test reproduces one attack or bad
request (a symlink swap while a request waits, a cross-site POST, DNS rebinding, a prompt too
long for the model, a flood of large bodies, values that used to be 500s) on a real server
subprocess, or on the request parser in process where the race needs a hook."""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'longva[serve]'")
pytest.importorskip("uvicorn", reason="needs the serve extra: pip install 'longva[serve]'")

from support.media import write_image, write_video  # noqa: E402
from support.server import HOST, Server, data_url, health, media_part, request, text, user, wait_until  # noqa: E402

from longva_cli.serve import openai_format as fmt  # noqa: E402
from longva_cli.serve.guard import HostPolicy  # noqa: E402
from longva_cli.serve.openai_format import APIError, RequestLimits, parse_chat_request  # noqa: E402

PROMPT_LIMIT = 2000  # --max-prompt-tokens of this module's server
MAX_QUEUE = 2
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> tuple[Path, Path]:
    """A media root and a folder outside it holding a picture of the same name but another size."""
    root, outside = tmp_path_factory.mktemp("media-root"), tmp_path_factory.mktemp("outside")
    (root / "album").mkdir()
    (outside / "album").mkdir()
    write_image(root / "album" / "photo.png", 160, 120)  # UniRes: 2 crops
    write_image(outside / "album" / "photo.png", 1000, 300)  # UniRes: 3 crops
    write_image(root / "square.png", 700, 700)  # UniRes: 4 crops
    write_video(root / "clip.mp4", frames=30, fps=10)
    return root, outside


@pytest.fixture(scope="module")
def server(tiny_checkpoint, roots, tmp_path_factory):
    running = Server(
        tiny_checkpoint, tmp_path_factory.mktemp("server"), "--media-root", str(roots[0]),
        "--allowed-hosts", "longva.internal", "--cors-origin", "http://app.example",
        "--max-prompt-tokens", str(PROMPT_LIMIT), "--max-frames", "64", "--max-tokens-limit", "16384",
        "--max-queue", str(MAX_QUEUE), "--max-request-mb", "16",
    )
    yield running
    running.stop()


@contextmanager
def model_busy(server: Server):
    """Keeps the one worker generating (greedy on the tiny model never ends its turn) until the
    block ends, then hangs up, which stops it."""
    connection = http.client.HTTPConnection(HOST, server.port, timeout=30)
    body = {"messages": [user(text("Go on."))], "max_tokens": 16384, "temperature": 0, "stream": True}
    connection.request("POST", CHAT, body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    try:
        yield
    finally:
        connection.sock.shutdown(socket.SHUT_RDWR)
        connection.close()
        wait_until(lambda: not health(server)["busy"], "the hung-up generation stopped")


def exchange(server: Server, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    """(status, headers, decoded JSON or bytes) with exactly the headers given (Host included)."""
    connection = http.client.HTTPConnection(HOST, server.port, timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        raw = response.read()
    finally:
        connection.close()
    try:
        return response.status, response.headers, json.loads(raw)
    except ValueError:
        return response.status, response.headers, raw


def ask_about(url: str, kind: str = "image_url", question: str = "What is it?", **extra) -> dict:
    return {"messages": [user(media_part(kind, url), text(question))], "max_tokens": 1, **extra}


# ---- 1. a symlink swap while the request waits in the queue ----------------------------------


@pytest.mark.integration
def test_a_symlink_swap_while_the_request_waits_reads_the_checked_file(server, roots):
    root, outside = roots
    inside_tokens = request(server, "POST", CHAT, ask_about(data_url(root / "album" / "photo.png", "image/png")))[1]["usage"]["prompt_tokens"]
    outside_tokens = request(server, "POST", CHAT, ask_about(data_url(outside / "album" / "photo.png", "image/png")))[1]["usage"]["prompt_tokens"]
    assert inside_tokens != outside_tokens
    with ThreadPoolExecutor(max_workers=1) as pool:
        try:
            with model_busy(server):
                queued = pool.submit(request, server, "POST", CHAT, ask_about(f"file://{root}/album/photo.png"))
                wait_until(lambda: health(server)["queued"] == 1, "the request was checked and queued")
                # Whoever can write in the media root replaces the checked folder with a link out of it.
                (root / "album").rename(root / "album-checked")
                (root / "album").symlink_to(outside / "album")
            status, answer = queued.result(timeout=120)
        finally:
            if (root / "album").is_symlink():
                (root / "album").unlink()
                (root / "album-checked").rename(root / "album")
    assert status == 200, answer
    assert answer["usage"]["prompt_tokens"] == inside_tokens  # the picture that was checked, not the outside one


def test_a_folder_swapped_between_resolving_and_opening_is_refused(roots, tmp_path, monkeypatch):
    root, outside = tmp_path / "root", roots[1]
    (root / "album").mkdir(parents=True)
    write_image(root / "album" / "photo.png", 64, 64)
    resolve = os.path.realpath
    swapped = []

    def resolve_then_swap(path, *args, **kwargs):
        resolved = resolve(path, *args, **kwargs)
        if not swapped:  # the attacker wins the race right after the path was resolved
            (root / "album").rename(root / "album-checked")
            (root / "album").symlink_to(outside / "album")
            swapped.append(True)
        return resolved

    limits = RequestLimits(media_roots=(root.resolve(),))
    monkeypatch.setattr(fmt.os.path, "realpath", resolve_then_swap)
    with pytest.raises(APIError) as refused:
        parse_chat_request(ask_about(f"file://{root}/album/photo.png"), limits, {"longva"}, "longva", tmp_path)
    assert swapped and refused.value.status == 403
    assert refused.value.param == "messages[0].content[0].image_url.url"


def test_the_decoders_read_the_held_file_after_its_path_changes(tmp_path):
    import av
    from PIL import Image

    root, outside = tmp_path / "root", tmp_path / "outside"
    for folder, frames, side in ((root, 30, 96), (outside, 12, 48)):
        (folder / "album").mkdir(parents=True)
        write_video(folder / "album" / "clip.mp4", frames=frames)
        write_image(folder / "album" / "photo.png", side, side)
    body = {"messages": [user(media_part("video_url", f"file://{root}/album/clip.mp4"), media_part("image_url", f"file://{root}/album/photo.png"))]}
    job = parse_chat_request(body, RequestLimits(media_roots=(root.resolve(),)), {"longva"}, "longva", tmp_path)
    (root / "album").rename(root / "album-checked")
    (root / "album").symlink_to(outside / "album")
    video, image = job.media
    with av.open(str(video.path)) as container:
        assert container.streams.video[0].frames == 30
    decord = pytest.importorskip("decord")
    assert len(decord.VideoReader(str(video.path))) == 30
    with Image.open(image.path) as picture:
        assert picture.size == (96, 96)
    descriptors = [video.fd, image.fd]
    job.cleanup()
    for fd in descriptors:
        with pytest.raises(OSError):
            os.fstat(fd)


# ---- 2. cross-site requests --------------------------------------------------------------


@pytest.mark.integration
def test_cross_site_requests_are_refused_and_allowed_sites_get_cors(server):
    body = json.dumps({"messages": [user(text("hi"))], "max_tokens": 1}).encode()
    here = f"{HOST}:{server.port}"
    as_json = {"Host": here, "Content-Type": "application/json"}

    def post(headers):
        return exchange(server, "POST", CHAT, body, headers)

    # A web page may send text/plain with no preflight: the server must not run it.
    status, _, answer = post({"Host": here, "Content-Type": "text/plain", "Origin": "http://evil.example"})
    assert (status, answer["error"]["code"]) == (403, "cross_origin")
    status, _, answer = post({"Host": here, "Content-Type": "text/plain"})
    assert (status, answer["error"]["code"]) == (415, "unsupported_media_type")
    for origin in ("http://evil.example", "null", f"http://{HOST}:{server.port + 1}"):
        status, _, answer = post({**as_json, "Origin": origin})
        assert (status, answer["error"]["code"]) == (403, "cross_origin"), origin
        assert f"--cors-origin {origin}" in answer["error"]["message"]
    # DNS rebinding: the attacker's name resolves to 127.0.0.1, the browser sends it as Host.
    status, _, answer = post({**as_json, "Host": f"rebind.evil.example:{server.port}"})
    assert (status, answer["error"]["code"]) == (400, "invalid_host")
    assert "--allowed-hosts rebind.evil.example" in answer["error"]["message"]
    assert exchange(server, "GET", "/health", headers={"Host": "rebind.evil.example"})[0] == 400

    # Same origin (the chat page), loopback names, --allowed-hosts, and the --cors-origin site pass.
    assert post({**as_json, "Origin": f"http://{here}"})[0] == 200
    assert post({**as_json, "Host": f"localhost:{server.port}", "Origin": f"http://localhost:{server.port}"})[0] == 200
    assert post({**as_json, "Host": f"longva.internal:{server.port}"})[0] == 200
    status, headers, _ = post({**as_json, "Origin": "http://app.example"})
    assert status == 200 and headers["access-control-allow-origin"] == "http://app.example"
    preflight = {"Host": here, "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    status, headers, _ = exchange(server, "OPTIONS", CHAT, headers=preflight)
    assert status == 200 and headers["access-control-allow-origin"] == "http://app.example"
    assert "POST" in headers["access-control-allow-methods"]
    assert {"authorization", "content-type"} <= {h.strip().lower() for h in headers["access-control-allow-headers"].split(",")}
    status, headers, _ = exchange(server, "OPTIONS", CHAT, headers={**preflight, "Origin": "http://evil.example"})
    assert status == 403 and "access-control-allow-origin" not in headers


@pytest.mark.parametrize(("bind", "accepted", "refused"), [
    ("127.0.0.1", ["127.0.0.1:8000", "localhost:8000", "LOCALHOST.", "[::1]:8000"], ["evil.example:8000", "192.168.1.5", "localhost.evil.example"]),
    ("::1", ["[::1]:8000", "localhost"], ["evil.example"]),
    ("0.0.0.0", ["192.168.1.5:8000", "localhost", "[fe80::1]:8000", socket.gethostname()], ["evil.example", "gpu-box.internal"]),
    ("192.168.1.5", ["192.168.1.5:8000"], ["localhost", "127.0.0.1", "192.168.1.6", "evil.example"]),
])
def test_host_header_names_the_bound_address(bind, accepted, refused):
    policy = HostPolicy(bind)
    assert [host for host in accepted if not policy.allows(host)] == []
    assert [host for host in refused if policy.allows(host)] == []
    assert HostPolicy(bind, ("gpu-box.internal",)).allows("gpu-box.internal:8000")
    assert HostPolicy(bind, ("*",)).allows("anything.example")


# ---- 4. the prompt's length, counted before any work ---------------------------------------


@pytest.mark.integration
def test_prompt_length_is_counted_exactly_at_the_limit(server, roots):
    root = roots[0]

    def body(padding: int) -> dict:
        return {"messages": [user(media_part("image_url", f"file://{root}/album/photo.png"), media_part("video_url", f"file://{root}/clip.mp4"),
                                  text("What happens?" + " fox" * padding))], "max_tokens": 1, "video": {"frames": 3}}

    status, answer = request(server, "POST", CHAT, body(0))
    assert status == 200, answer
    room = PROMPT_LIMIT - answer["usage"]["prompt_tokens"]
    assert room > 0
    status, answer = request(server, "POST", CHAT, body(room))
    assert status == 200 and answer["usage"]["prompt_tokens"] == PROMPT_LIMIT, answer
    status, answer = request(server, "POST", CHAT, body(room + 1))
    assert (status, answer["error"]["code"], answer["error"]["param"]) == (400, "prompt_too_long", "messages[0].content"), answer
    assert f"{PROMPT_LIMIT + 1:,} tokens" in answer["error"]["message"]


@pytest.mark.integration
def test_prompts_over_the_limit_are_refused_while_the_model_is_busy(server, roots):
    root = roots[0]
    square = media_part("image_url", data_url(root / "square.png", "image/png"))
    video = f"file://{root}/clip.mp4"
    with model_busy(server):  # answered at once: nothing over the limit waits for the model
        cases = {
            "video.frames": ask_about(video, "video_url", video={"frames": 20}),  # 20 x 144 tokens
            "messages[0].content": {"messages": [user(text("fox " * 2_000_000))]},  # 8 MB of text
        }
        for param, body in cases.items():
            status, answer = request(server, "POST", CHAT, body)
            assert (status, answer["error"]["code"], answer["error"]["param"]) == (400, "prompt_too_long", param), answer
        # Four 700x700 images: 4 crops of 144 tokens each.
        status, answer = request(server, "POST", CHAT, {"messages": [user(square, square, square, square, text("Compare."))]})
        assert (status, answer["error"]["code"]) == (400, "prompt_too_long"), answer
        assert answer["error"]["param"].startswith("messages[0].content[") and answer["error"]["param"].endswith("image_url.url")
        # At 10 fps the 3-second clip gives 30 frames; at 1 fps, 3: counted from the container, not the cap of 64.
        status, answer = request(server, "POST", CHAT, ask_about(video, "video_url", video={"fps": 10}))
        assert (status, answer["error"]["param"]) == (400, "video.frames"), answer
        assert health(server)["queued"] == 0
    status, answer = request(server, "POST", CHAT, ask_about(video, "video_url", video={"fps": 1}))
    assert status == 200 and answer["usage"]["prompt_tokens"] > 3 * 144, answer


# ---- 6. a full queue refuses before reading a body ---------------------------------------


def open_upload(server: Server, size: int) -> socket.socket:
    """A connection that has sent the headers of a `size`-byte POST and none of its body."""
    sock = socket.create_connection((HOST, server.port), timeout=30)
    sock.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: {HOST}:{server.port}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {size}\r\n\r\n".encode())
    return sock


def read_answer(sock: socket.socket) -> tuple[int, dict]:
    raw = b""
    while b"\r\n\r\n" not in raw or len(raw.partition(b"\r\n\r\n")[2]) < int(raw.lower().partition(b"content-length:")[2].split(b"\r\n")[0] or 0):
        piece = sock.recv(65536)
        if not piece:
            break
        raw += piece
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def body_files(server: Server) -> list[Path]:
    return list(server.tmpdir.glob("longva-serve-*/body-*.json"))


@pytest.mark.integration
def test_a_full_queue_refuses_large_bodies_before_reading_them(server):
    with ThreadPoolExecutor(max_workers=MAX_QUEUE) as pool:
        with model_busy(server):
            queued = [pool.submit(request, server, "POST", CHAT, {"messages": [user(text(f"Wait {i}."))], "max_tokens": 1})
                      for i in range(MAX_QUEUE)]
            wait_until(lambda: health(server)["queued"] == MAX_QUEUE, "the queue filled")
            refused = [open_upload(server, 12 * 2**20) for _ in range(4)]
            try:
                for sock in refused:  # answered with none of the 12 MiB body sent
                    status, answer = read_answer(sock)
                    assert (status, answer["error"]["code"]) == (503, "queue_full")
            finally:
                for sock in refused:
                    sock.close()
        assert [future.result(timeout=120)[0] for future in queued] == [200] * MAX_QUEUE


@pytest.mark.integration
def test_bodies_being_received_go_to_files_take_no_queue_place_and_are_bounded(server):
    size, sent = 16 * 2**20, 15 * 2**20  # --max-request-mb 16; bodies in flight may hold 2 x 16 MiB (--max-queue 2)
    uploads = [open_upload(server, size) for _ in range(2)]
    try:
        for sock in uploads:
            sock.sendall(b'{"messages": [{"role": "user", "content": "' + b"x" * (sent - 40))
        wait_until(lambda: sum(path.stat().st_size for path in body_files(server)) >= 2 * (sent - 40), "the bodies reached the disk")
        assert len(body_files(server)) == 2  # one file per body, written as it arrives
        assert (health(server)["uploading"], health(server)["waiting"]) == (2, 0)
        # 30 MiB are held: a third body of 12 MiB would pass the 32 MiB bound; refused before it is sent.
        third = open_upload(server, 12 * 2**20)
        status, answer = read_answer(third)
        third.close()
        assert (status, answer["error"]["code"]) == (503, "uploads_full")
        assert request(server, "POST", CHAT, {"messages": [user(text("hi"))], "max_tokens": 1})[0] == 200  # small ones still fit
    finally:
        for sock in uploads:
            sock.close()
    # Uploads abandoned: their files are deleted and their room given back.
    wait_until(lambda: health(server)["uploading"] == 0 and not body_files(server), "the abandoned uploads were cleaned up")


# ---- 400s that used to be 500s -------------------------------------------------------------


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims `width` x `height` pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b"")


@pytest.mark.integration
def test_broken_values_are_400s_naming_the_field(server, roots, tmp_path):
    root = roots[0]
    (root / "bomb.png").write_bytes(png_claiming(30000, 30000))
    bomb = "data:image/png;base64," + base64.b64encode(png_claiming(30000, 30000)).decode()
    not_media = "data:application/octet-stream;base64," + base64.b64encode(b"just some words, no media here\n" * 20).decode()
    deep = "[" * 50_000 + "]" * 50_000
    small = {"messages": [user(text("hi"))], "max_tokens": 1}
    cases = [
        (f'{{"messages": [{{"role": "user", "content": {deep}}}]}}'.encode(), "messages[0].content[0][0][0]"),
        (json.dumps(ask_about(f"file://{root}/album/pho%00to.png")).encode(), "messages[0].content[0].image_url.url"),
        (json.dumps({**small, "seed": 10**30}).encode(), "seed"),
        (json.dumps({**small, "seed": -(10**30)}).encode(), "seed"),
        (json.dumps({**small, "top_k": 10**30}).encode(), "top_k"),
        (json.dumps({**small, "max_tokens": 10**30}).encode(), "max_tokens"),
        (json.dumps({**small, "max_completion_tokens": 10**30}).encode(), "max_completion_tokens"),
        (json.dumps({**small, "video": {"frames": 10**30}}).encode(), "video.frames"),
        (json.dumps({**small, "video": {"fps": 1e-300}}).encode(), "video.fps"),
        (json.dumps(ask_about(bomb)).encode(), "messages[0].content[0].image_url.url"),
        (json.dumps(ask_about(f"file://{root}/bomb.png")).encode(), "messages[0].content[0].image_url.url"),
        (json.dumps(ask_about(not_media, "video_url", video={"frames": 2})).encode(), "messages[0].content[0].video_url.url"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', None),
        (b'{"messages": [{"role": "user", "content": "hi"}], "seed": 1' + b"0" * 5000 + b"}", None),
        (b"[" * 50_000 + b"]" * 50_000, None),
    ]
    wrong = []
    for body, param in cases:
        status, answer = request(server, "POST", CHAT, body)
        error = answer.get("error") if isinstance(answer, dict) else None
        if status != 400 or not error or error["param"] != param or not error["message"]:
            wrong.append(f"{body[:60]!r}: {status} {answer!r:.300}")
    assert not wrong, "\n".join(wrong)
    assert "Traceback" not in server.log()
    assert request(server, "POST", CHAT, small)[0] == 200
