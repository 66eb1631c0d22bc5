"""`longva serve`: the real server in a subprocess on a loopback port, a tiny checkpoint, the
official `openai` client, raw HTTP for malformed requests, and a headless Chromium for the page."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'longva[serve]'")
pytest.importorskip("uvicorn", reason="needs the serve extra: pip install 'longva[serve]'")
openai = pytest.importorskip("openai", reason="needs the dev extra (openai client)")

from support.media import write_image, write_video  # noqa: E402
from support.server import API_KEY, HOST, Server, authorized, corrupt_video_url, data_url, media_part, request, text, user  # noqa: E402

from longva_cli.model.prompt import DEFAULT_SYSTEM, Turn, chat_prompt  # noqa: E402
from longva_cli.serve.openai_format import APIError, RequestLimits, parse_chat_request  # noqa: E402

@pytest.fixture(scope="module")
def media_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("media-root")
    write_video(root / "clip.mp4", frames=30)
    write_image(root / "photo.png", 160, 120)
    outside = tmp_path_factory.mktemp("outside")
    write_image(outside / "secret.png", 64, 64)
    (root / "link.png").symlink_to(outside / "secret.png")
    return root


@pytest.fixture(scope="module")
def server(tiny_checkpoint, media_root, tmp_path_factory):
    running = Server(
        tiny_checkpoint, tmp_path_factory.mktemp("server"),
        "--media-root", str(media_root), "--api-key", API_KEY, "--ui",
        "--max-frames", "8", "--max-tokens-limit", "4096", "--max-media", "3", "--max-request-mb", "1", "--max-queue", "64",
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, timeout=60, max_retries=0)


# ---- request parsing (in process) ----------------------------------------------------------


def test_media_parts_become_placeholders_in_their_turn_in_order(media_root, tmp_path):
    body = {"messages": [
        {"role": "system", "content": "Be brief."},
        user(text("Compare"), media_part("image_url", f"file://{media_root}/photo.png"), media_part("video_url", f"file://{media_root}/clip.mp4")),
        {"role": "assistant", "content": "They differ."},
        user(text("How?")),
    ]}
    job = parse_chat_request(body, RequestLimits(media_roots=(media_root.resolve(),)), {"longva"}, "longva", tmp_path)
    assert [m.kind for m in job.media] == ["image", "video"]
    assert chat_prompt(job.turns, job.system) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nCompare\n<image>\n<image><|im_end|>\n"
        "<|im_start|>assistant\nThey differ.<|im_end|>\n"
        "<|im_start|>user\nHow?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_one_video_and_a_question_render_exactly_as_ask_does(media_root, tmp_path):
    body = {"messages": [user(media_part("video_url", f"file://{media_root}/clip.mp4"), text("What happens?"))]}
    job = parse_chat_request(body, RequestLimits(media_roots=(media_root.resolve(),)), {"longva"}, "longva", tmp_path)
    assert job.system == DEFAULT_SYSTEM and job.frames == 32
    assert chat_prompt(job.turns, job.system) == chat_prompt([Turn("user", "<image>\nWhat happens?")])


def test_a_bad_part_after_a_data_url_leaves_no_file_behind(media_root, tmp_path):
    body = {"messages": [user(media_part("image_url", data_url(media_root / "photo.png", "image/png")), {"type": "audio_url"})]}
    with pytest.raises(APIError, match="audio_url"):
        parse_chat_request(body, RequestLimits(), {"longva"}, "longva", tmp_path)
    assert list(tmp_path.iterdir()) == []


# ---- the server --------------------------------------------------------------------------


@pytest.mark.integration
def test_health_and_models(server):
    status, health = request(server, "GET", "/health")
    assert status == 200 and health["status"] == "ok"
    status, models = request(server, "GET", "/v1/models", headers=authorized())
    assert status == 200 and [m["id"] for m in models["data"]] == ["longva"]
    status, refused = request(server, "GET", "/v1/models")
    assert status == 401 and refused["error"]["code"] == "invalid_api_key"


@pytest.mark.integration
def test_openai_client_answers_about_a_video_file(client, media_root, tiny_longva):
    def ask(frames: int):
        return client.chat.completions.create(
            model="longva",
            messages=[user(media_part("video_url", f"file://{media_root}/clip.mp4"), text("What happens?"))],
            max_tokens=4, temperature=0, extra_body={"video": {"frames": frames}},
        )

    two, four = ask(2), ask(4)
    expected = tiny_longva.ask(media_root / "clip.mp4", "What happens?", frames=2, max_new_tokens=4, temperature=0)
    assert two.choices[0].message.role == "assistant" and two.choices[0].message.content == expected.answer
    assert two.usage.completion_tokens == expected.generated_tokens
    assert two.choices[0].finish_reason == expected.finish_reason
    # "length" exactly when the answer used all of max_tokens (a stop token is never counted)
    assert two.choices[0].finish_reason == ("length" if two.usage.completion_tokens == 4 else "stop")
    # Two more frames are two more blocks of 144 visual tokens in the prompt.
    assert four.usage.prompt_tokens - two.usage.prompt_tokens == 2 * 144
    assert two.usage.total_tokens == two.usage.prompt_tokens + two.usage.completion_tokens


@pytest.mark.integration
@pytest.mark.parametrize("temperature, seed", [(0.0, 0), (0.9, 11)], ids=["greedy", "seeded-sampling"])
def test_serve_and_ask_give_the_same_answer(client, media_root, tiny_checkpoint, temperature, seed):
    """The same checkpoint, video, question and sampling through `longva ask --json` and the server."""
    question = "What happens in this video?"
    done = subprocess.run(
        [sys.executable, "-m", "longva_cli", "ask", str(media_root / "clip.mp4"), question, "--model", str(tiny_checkpoint),
         "--frames", "3", "--max-new-tokens", "8", "--temperature", str(temperature), "--seed", str(seed),
         "--device", "cpu", "--no-cache", "--json"],
        check=False, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    asked = json.loads(done.stdout)
    served = client.chat.completions.create(
        model="longva", messages=[user(media_part("video_url", f"file://{media_root}/clip.mp4"), text(question))],
        max_tokens=8, temperature=temperature, seed=seed, extra_body={"video": {"frames": 3}},
    )
    assert asked["generated_tokens"] > 0
    assert served.choices[0].message.content == asked["answer"]
    assert (served.usage.prompt_tokens, served.usage.completion_tokens) == (asked["prompt_tokens"], asked["generated_tokens"])
    assert served.choices[0].finish_reason == asked["finish_reason"]


@pytest.mark.integration
def test_streamed_answer_matches_the_whole_answer(client, media_root):
    messages = [user(media_part("image_url", data_url(media_root / "photo.png", "image/png")), text("Describe the image."))]
    whole = client.chat.completions.create(model="longva", messages=messages, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(
        model="longva", messages=messages, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True},
    ))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed.strip() == whole.choices[0].message.content
    assert whole.choices[0].finish_reason == ("length" if whole.usage.completion_tokens == 12 else "stop")


@pytest.mark.integration
def test_video_data_url_is_decoded_and_its_temporary_file_deleted(server, client, media_root):
    answer = client.chat.completions.create(
        model="longva", messages=[user(media_part("video_url", data_url(media_root / "clip.mp4", "video/mp4")), text("What moves?"))],
        max_tokens=2, extra_body={"video": {"frames": 3}},
    )
    assert answer.usage.prompt_tokens > 3 * 144
    leftovers = [p for p in server.tmpdir.rglob("*") if p.is_file()]
    assert leftovers == []


@pytest.mark.integration
def test_multi_turn_conversation_samples_reproducibly_with_a_seed(client, media_root):
    def ask(seed: int):
        return client.chat.completions.create(model="longva", max_completion_tokens=6, seed=seed, temperature=1.0, messages=[
            {"role": "system", "content": "You answer in one word."},
            user(media_part("image_url", f"file://{media_root}/photo.png"), text("What is it?")),
            {"role": "assistant", "content": "A ramp."},
            {"role": "user", "content": "And its colour?"},
        ])

    first, again = ask(7), ask(7)
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.choices[0].finish_reason == ("length" if first.usage.completion_tokens == 6 else "stop")
    one_turn = client.chat.completions.create(model="longva", max_tokens=1, messages=[
        user(media_part("image_url", f"file://{media_root}/photo.png"), text("What is it?"))])
    assert first.usage.prompt_tokens > one_turn.usage.prompt_tokens


@pytest.mark.integration
def test_follow_up_requests_prefill_only_their_new_tokens_and_answer_as_cold_ones(client, media_root, tiny_longva):
    video = media_part("video_url", f"file://{media_root}/clip.mp4")

    def ask(messages):
        return client.chat.completions.create(model="longva", messages=messages, max_tokens=5, temperature=0, extra_body={"video": {"frames": 3}})

    from longva_cli.engine import MediaSpec, Session, drive

    def cold(question: str, turns: list[Turn] = ()) -> str:
        session = Session(tiny_longva, [MediaSpec(media_root / "clip.mp4", frames=3)], turns=list(turns), keep_history=False)
        return drive(session.ask(question, tiny_longva.sampling_settings(max_new_tokens=5, temperature=0))).answer

    openings = ["What happens first?", "What colour is the square?"]
    firsts = [ask([user(video, text(opening))]) for opening in openings]
    assert firsts[1].usage.prompt_tokens_details.cached_tokens >= 3 * 144  # the video's tokens were kept
    assert [first.choices[0].message.content for first in firsts] == [cold(opening) for opening in openings]
    assert firsts[0].choices[0].message.content != firsts[1].choices[0].message.content
    seconds = []
    for opening, first in zip(openings, firsts):  # the two conversations go on, interleaved with each other
        said = first.choices[0].message.content
        next_turn = ask([user(video, text(opening)), {"role": "assistant", "content": said}, {"role": "user", "content": "And then?"}])
        assert next_turn.usage.prompt_tokens_details.cached_tokens >= (first.usage.prompt_tokens - 1) // 16 * 16  # whole blocks of 16
        seconds.append(next_turn.choices[0].message.content)
        assert seconds[-1] == cold("And then?", [Turn("user", "<image>\n" + opening), Turn("assistant", said)])
    assert seconds[0] != seconds[1]  # one question, two histories: a mixed-up cache would show


def malformed_cases(root: Path):
    """(name, body, extra headers, expected status) for requests the server must refuse."""
    video = media_part("video_url", f"file://{root}/clip.mp4")
    ask = text("What happens?")
    ok = {"model": "longva", "messages": [user(video, ask)], "max_tokens": 2}
    return [
        ("bad json", b'{"messages": [', None, 400),
        ("not an object", b"[1, 2]", None, 400),
        ("not utf-8", b"\xff\xfe{}", None, 400),
        ("missing messages", {"model": "longva"}, None, 400),
        ("empty messages", {"messages": []}, None, 400),
        ("messages not a list", {"messages": "hi"}, None, 400),
        ("tool role", {"messages": [{"role": "tool", "content": "x"}, user(ask)]}, None, 400),
        ("unknown role", {"messages": [{"role": "robot", "content": "x"}]}, None, 400),
        ("last turn not the user's", {"messages": [user(ask), {"role": "assistant", "content": "x"}]}, None, 400),
        ("user content null", {"messages": [{"role": "user", "content": None}]}, None, 400),
        ("unknown part type", {"messages": [user({"type": "audio_url", "audio_url": {"url": "x"}})]}, None, 400),
        ("part not an object", {"messages": [user("just a string")]}, None, 400),
        ("media in assistant turn", {"messages": [{"role": "assistant", "content": [video]}, user(ask)]}, None, 400),
        ("image part without url", {"messages": [user({"type": "image_url", "image_url": {}})]}, None, 400),
        ("bad base64", {"messages": [user(media_part("image_url", "data:image/png;base64,@@@not-base64@@@"))]}, None, 400),
        ("non-media data url", {"messages": [user(media_part("image_url", "data:text/plain;base64,aGVsbG8="))]}, None, 400),
        ("data url not base64", {"messages": [user(media_part("image_url", "data:image/png,abc"))]}, None, 400),
        ("remote url", {"messages": [user(media_part("image_url", "https://example.com/a.png"))]}, None, 400),
        ("file outside media root", {"messages": [user(media_part("image_url", "file:///etc/hostname"))]}, None, 403),
        ("dot-dot escape", {"messages": [user(media_part("image_url", f"file://{root}/../outside/secret.png"))]}, None, 403),
        ("symlink escape", {"messages": [user(media_part("image_url", f"file://{root}/link.png"))]}, None, 403),
        ("missing file in root", {"messages": [user(media_part("image_url", f"file://{root}/nope.png"))]}, None, 400),
        ("too many frames", {**ok, "video": {"frames": 9}}, None, 400),
        ("zero frames", {**ok, "video": {"frames": 0}}, None, 400),
        ("unknown video option", {**ok, "video": {"frame": 2}}, None, 400),
        ("negative max_tokens", {**ok, "max_tokens": -1}, None, 400),
        ("max_tokens above limit", {**ok, "max_tokens": 4097}, None, 400),
        ("negative temperature", {**ok, "temperature": -0.5}, None, 400),
        ("top_p zero", {**ok, "top_p": 0}, None, 400),
        ("two choices", {**ok, "n": 2}, None, 400),
        ("stream not a bool", {**ok, "stream": "maybe"}, None, 400),
        ("too many media", {"messages": [user(video, video, video, video, ask)]}, None, 400),
        ("literal placeholder", {"messages": [user(text("look: <image>"))]}, None, 400),
        ("undecodable video", {"messages": [user(media_part("video_url", corrupt_video_url()), ask)], "max_tokens": 2}, None, 400),
        ("undecodable video, streaming", {"messages": [user(media_part("video_url", corrupt_video_url()), ask)], "stream": True}, None, 400),
        ("unknown model", {**ok, "model": "gpt-4o"}, None, 404),
        ("oversized body", {**ok, "padding": "x" * (1024 * 1024 + 10)}, None, 413),
        ("wrong api key", ok, {"Authorization": "Bearer nope"}, 401),
        ("no api key", ok, {"Authorization": ""}, 401),
    ]


@pytest.mark.integration
def test_malformed_requests_get_openai_errors_and_the_server_keeps_serving(server, media_root):
    cases = malformed_cases(media_root)
    assert len(cases) >= 20
    wrong = []
    for name, body, headers, expected in cases:
        status, answer = request(server, "POST", "/v1/chat/completions", body, headers=authorized(headers))
        error = answer.get("error") if isinstance(answer, dict) else None
        if status != expected or not error or set(error) != {"message", "type", "param", "code"} or not error["message"]:
            wrong.append(f"{name}: {status} {answer!r:.200}")
    assert not wrong, "\n".join(wrong)
    assert request(server, "GET", "/health")[0] == 200
    assert request(server, "GET", "/v1/chat/completions", headers=authorized())[0] == 405
    status, answer = request(server, "POST", "/v1/chat/completions", {"messages": [user(text("still there?"))], "max_tokens": 2}, headers=authorized())
    assert status == 200, answer


@pytest.mark.integration
def test_errors_name_the_field_and_the_fix(server, media_root):
    status, answer = request(server, "POST", "/v1/chat/completions", {
        "messages": [user(text("a"), media_part("video_url", "file:///etc/hostname"))]}, headers=authorized())
    assert status == 403
    assert answer["error"]["param"] == "messages[0].content[1].video_url.url"
    assert "outside" in answer["error"]["message"]
    status, answer = request(server, "POST", "/v1/chat/completions", {"messages": [user(text("a"))], "temperature": -1}, headers=authorized())
    assert (status, answer["error"]["param"]) == (400, "temperature")
    status, answer = request(server, "POST", "/v1/chat/completions", {
        "messages": [user(media_part("video_url", corrupt_video_url()), text("a"))]}, headers=authorized())
    assert status == 400 and answer["error"]["code"] == "invalid_media"
    # The core's message, naming the part the client sent rather than a temporary file.
    assert "the data: URL at messages[0].content[0].video_url.url" in answer["error"]["message"], answer


@pytest.mark.integration
def test_fifty_concurrent_requests_all_complete(server, client, media_root):
    image = media_part("image_url", f"file://{media_root}/photo.png")

    def one(i: int):
        return client.chat.completions.create(model="longva", messages=[user(image, text(f"Question {i}?"))], max_tokens=2, seed=i)

    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(one, range(50), timeout=120))
    assert len(answers) == 50 and len({a.id for a in answers}) == 50
    for a in answers:
        assert a.choices[0].finish_reason == ("length" if a.usage.completion_tokens == 2 else "stop")
    # answered among 49 others, a request gets what it gets alone
    for i in (0, 17, 49):
        alone = one(i)
        assert (answers[i].choices[0].message.content, answers[i].usage.completion_tokens) == (alone.choices[0].message.content, alone.usage.completion_tokens)
    assert request(server, "GET", "/health")[1]["waiting"] == 0


@pytest.mark.integration
def test_client_hanging_up_stops_its_generation(server, media_root):
    # Greedy on the tiny model never emits its end token: 4096 tokens take seconds.
    body = {"messages": [user(media_part("image_url", f"file://{media_root}/photo.png"), text("Talk."))],
            "max_tokens": 4096, "temperature": 0, "stream": True}
    connection = http.client.HTTPConnection(HOST, server.port, timeout=30)
    connection.request("POST", "/v1/chat/completions", body=json.dumps(body), headers=authorized({"Content-Type": "application/json"}))
    response = connection.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")
    # The server's own pace, measured here: the rest of the answer would take this long per token.
    started, lines = time.monotonic(), 0
    while lines < 20:
        lines += response.readline().startswith(b"data: ")
    seconds_per_token = (time.monotonic() - started) / 20
    assert request(server, "GET", "/health")[1]["busy"]
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    hung_up = time.monotonic()
    while request(server, "GET", "/health")[1]["busy"]:
        time.sleep(0.05)
    # stopped long before the 4,000 tokens left could have been generated
    assert time.monotonic() - hung_up < 0.25 * 4000 * seconds_per_token


# ---- queueing and shutdown (their own servers) ---------------------------------------------


@pytest.mark.integration
def test_full_queue_and_queue_timeout_give_503_then_sigterm_exits_cleanly(tiny_checkpoint, media_root, tmp_path):
    server = Server(tiny_checkpoint, tmp_path, "--max-queue", "1", "--queue-timeout", "1.5", "--max-tokens-limit", "16384")
    try:
        video = media_part("video_url", data_url(media_root / "clip.mp4", "video/mp4"))
        # Greedy on the tiny model never emits its end token: this runs until stopped.
        long_body = {"messages": [user(video, text("Go on."))], "max_tokens": 16384, "temperature": 0, "stream": True, "video": {"frames": 2}}
        busy = http.client.HTTPConnection(HOST, server.port, timeout=30)
        busy.request("POST", "/v1/chat/completions", body=json.dumps(long_body), headers={"Content-Type": "application/json"})
        running = busy.getresponse()
        assert running.status == 200 and running.readline().startswith(b"data: ")

        short = {"messages": [user(text("hi"))], "max_tokens": 2}
        with ThreadPoolExecutor(max_workers=1) as pool:
            waiting = pool.submit(request, server, "POST", "/v1/chat/completions", short)
            deadline = time.monotonic() + 10
            while request(server, "GET", "/health")[1]["waiting"] < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            status, answer = request(server, "POST", "/v1/chat/completions", short)
            assert (status, answer["error"]["code"]) == (503, "queue_full")
            status, answer = waiting.result(timeout=30)
            assert (status, answer["error"]["code"]) == (503, "queue_timeout")

        status, answer = request(server, "POST", "/v1/chat/completions",
                                 {"messages": [user(media_part("image_url", f"file://{media_root}/photo.png"))]})
        assert status == 403 and "--media-root" in answer["error"]["message"]

        assert server.stop(signal.SIGTERM) == 0, server.log()  # exit 0, not killed after stop()'s 15 s
        rest = running.read()  # the stream in flight ends with an error event and [DONE] rather than hanging
        assert b'"code": "shutting_down"' in rest and rest.rstrip().endswith(b"data: [DONE]"), rest[-500:]
        busy.close()
    finally:
        server.stop(signal.SIGKILL)


@pytest.mark.integration
def test_sigint_stops_the_server_with_exit_code_0(tiny_checkpoint, tmp_path):
    server = Server(tiny_checkpoint, tmp_path)
    assert server.stop(signal.SIGINT) == 0, server.log()  # exit 0, not killed after stop()'s 15 s
    assert "Traceback" not in server.log()


def test_file_urls_are_refused_by_default(tmp_path, media_root):
    with pytest.raises(APIError) as refused:
        parse_chat_request({"messages": [user(media_part("video_url", f"file://{media_root}/clip.mp4"))]}, RequestLimits(), {"longva"}, "longva", tmp_path)
    assert refused.value.status == 403 and "--media-root" in refused.value.message


@pytest.mark.integration
def test_a_port_in_use_fails_before_the_model_loads(tiny_checkpoint):
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "longva_cli", "serve", "--model", str(tiny_checkpoint), "--port", str(port)],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: cannot listen on {HOST}:{port} (Address already in use); pick another --port or --host."


def test_a_missing_serve_extra_gives_an_install_hint(monkeypatch):
    import importlib.util

    from longva_cli.errors import LongVAError
    from longva_cli.serve import cli as serve_cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    with pytest.raises(LongVAError, match=r"pip install 'longva\[serve\]'"):
        serve_cli.require_serve_extra()


# ---- the chat page in a real browser -------------------------------------------------------


def chromium_paths() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.integration
@pytest.mark.skipif(chromium_paths() is None, reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
def test_chat_page_uploads_media_and_shows_the_streamed_answer(server, media_root, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync", "--window-size=1000,900", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        driver.set_page_load_timeout(30)
        driver.get(f"{server.base_url}/")  # redirects to /ui
        assert driver.current_url.endswith("/ui")
        driver.find_element(By.CSS_SELECTOR, "details summary").click()
        for field, value in (("api-key", API_KEY), ("frames", "2"), ("max-tokens", "8")):
            element = driver.find_element(By.ID, field)
            element.clear()
            element.send_keys(value)
        driver.find_element(By.ID, "question").click()  # blur: the key is stored on change
        wait = WebDriverWait(driver, 60)

        def ask(media: Path, question: str, answers: int) -> str:
            driver.find_element(By.ID, "media").send_keys(str(media))
            wait.until(lambda d: "ready" in d.find_element(By.ID, "media-name").text)
            driver.find_element(By.ID, "question").send_keys(question)
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '.msg.assistant[data-state="done"], .msg.error')) >= answers)
            errors = driver.find_elements(By.CSS_SELECTOR, ".msg.error")
            assert not errors, errors[0].text
            return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text

        first = ask(media_root / "photo.png", "What is in the picture?", 1)
        second = ask(media_root / "clip.mp4", "And in this video?", 2)
        assert first.strip() and second.strip()
        assert len(driver.find_elements(By.CSS_SELECTOR, ".msg.user img")) == 1
        assert len(driver.find_elements(By.CSS_SELECTOR, ".msg.user video")) == 1
        screenshot = tmp_path / "serve-ui.png"
        driver.save_screenshot(str(screenshot))
        print(f"chat page screenshot: {screenshot}")
    finally:
        driver.quit()
