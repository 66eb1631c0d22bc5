"""SIGTERM while the model is inside a long prefill: every client gets a clean answer at once
(an error event then `[DONE]` on a stream, 503 JSON otherwise), the log holds no traceback,
and the server exits 0 although the prefill itself cannot be interrupted."""

from __future__ import annotations

import http.client
import json
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'longva[serve]'")
pytest.importorskip("uvicorn", reason="needs the serve extra: pip install 'longva[serve]'")

from support.server import HOST, Server, request, sse_events, text, user, wait_until  # noqa: E402

# About 30,000 prompt tokens: on the tiny model, a prefill of tens of seconds on two cores.
LONG_QUESTION = "Summarise:" + " fox" * 30_000
CHAT = "/v1/chat/completions"


@pytest.mark.integration
@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "waiting"])
def test_sigterm_during_a_long_prefill_answers_everyone_and_exits_0(tiny_checkpoint, tmp_path, stream):
    server = Server(tiny_checkpoint, tmp_path)
    try:
        long_request = http.client.HTTPConnection(HOST, server.port, timeout=60)
        body = {"messages": [user(text(LONG_QUESTION))], "max_tokens": 4, "temperature": 0, "stream": stream}
        long_request.request("POST", CHAT, body=json.dumps(body), headers={"Content-Type": "application/json"})
        if stream:
            response = long_request.getresponse()
            # The role chunk goes out once the prompt is built, just before the prefill starts.
            assert response.status == 200 and response.readline().startswith(b"data: ")
        else:
            wait_until(lambda: request(server, "GET", "/health")[1]["busy"], "the long request reached the model")
        with ThreadPoolExecutor(max_workers=1) as pool:
            queued = pool.submit(request, server, "POST", CHAT, {"messages": [user(text("hi"))], "max_tokens": 1})
            wait_until(lambda: request(server, "GET", "/health")[1]["queued"] == 1, "a second request waits in the queue")
            exit_code = server.stop(signal.SIGTERM)
            status, answer = queued.result(timeout=30)
        assert exit_code == 0, server.log()
        assert (status, answer["error"]["code"]) == (503, "shutting_down")
        if stream:
            events = sse_events(response.read())
            assert events[-1] == "[DONE]", events
            assert events[-2]["error"]["code"] == "shutting_down", events
        else:
            response = long_request.getresponse()
            answer = json.loads(response.read())
            assert (response.status, answer["error"]["code"]) == (503, "shutting_down")
        long_request.close()
        log = server.log()
        for sign in ("Traceback", "CancelledError", "terminate called"):
            assert sign not in log, log
    finally:
        server.stop(signal.SIGKILL)
