"""`longva serve` as a real process on a free loopback port, and requests to it over raw HTTP."""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from longva_cli.parallel.ranks import free_port


API_KEY = "test-key"
HOST = "127.0.0.1"
START_TIMEOUT_S = 90


class Server:
    """`python -m longva_cli serve` on a free loopback port, stopped by a signal."""

    def __init__(self, checkpoint: Path, workdir: Path, *flags: str) -> None:
        self.port = free_port()
        self.tmpdir = workdir / "tmp"  # the server's TMPDIR: where data: URLs are written
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "server.log"
        command = [sys.executable, "-m", "longva_cli", "serve", "--model", str(checkpoint), "--host", HOST,
                   "--port", str(self.port), "--log-level", "warning", *flags]
        # One OpenMP thread: the tiny model gains nothing from more, and on a busy 2-core machine
        # spinning OpenMP threads made each request 10-40x slower.
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(self.tmpdir), "OMP_NUM_THREADS": "1"}
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if request(self, "GET", "/health", timeout=2)[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        pytest.fail(f"server did not answer /health within {START_TIMEOUT_S}s:\n{self.log()}")

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def request(server: Server, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None, timeout: float = 60):
    """(status, decoded JSON or raw bytes) over a fresh connection."""
    connection = http.client.HTTPConnection(HOST, server.port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        try:
            connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered (413) and closed before the whole body was sent: read that answer
        response = connection.getresponse()
        raw = response.read()
    finally:
        connection.close()
    try:
        return response.status, json.loads(raw)
    except ValueError:
        return response.status, raw


def health(server) -> dict:
    return request(server, "GET", "/health")[1]


def wait_until(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting until {what}")
        time.sleep(0.02)


def authorized(extra: dict | None = None) -> dict:
    return {"Authorization": f"Bearer {API_KEY}", **(extra or {})}


def data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def user(*parts) -> dict:
    return {"role": "user", "content": list(parts)}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def media_part(kind: str, url: str) -> dict:
    return {"type": kind, kind: {"url": url}}


def corrupt_video_url() -> str:
    return "data:video/mp4;base64," + base64.b64encode(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000)).decode()


def sse_events(raw: bytes) -> list:
    """The payloads of a server-sent event stream, JSON decoded except `[DONE]`."""
    events = []
    for line in raw.decode().splitlines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events
