"""`--kv-cache fp8` through the commands: a LongVA loaded with it answers, chats and serves with
float8 keys and values; chat turns that reuse an fp8 cache answer as cold fp8 runs do. (How far
fp8 moves the tiny checkpoint's answers from float32: benchmarks/kv_fp8_quality.py.)
(The cache itself, forks, crops and its bytes: tests/model/test_kv_cache.py; V-NIAH: tests/niah/test_niah.py;
`eval ppl`: tests/eval/test_ppl.py.)"""

from __future__ import annotations

import json
import sys

import pytest

from longva_cli.engine import MediaSpec, Session, drive
from longva_cli.engine.memory import kv_bytes_per_token
from longva_cli.engine.sequence import build
from longva_cli.model.kv_cache import FLOAT8, Float8KVLayer
from longva_cli import LongVA

QUESTIONS = ["What happens in the video?", "What colour is the square?", "And after that?"]


@pytest.fixture(scope="module")
def fp8_longva(tiny_checkpoint):
    return LongVA.from_pretrained(str(tiny_checkpoint), device="cpu", kv_cache="fp8")


@pytest.mark.parametrize("media", ["video", "image"])
def test_chat_turns_with_an_fp8_cache_answer_as_cold_fp8_runs(media, fp8_longva, video_file, image_file):
    path = video_file if media == "video" else image_file
    sampling = fp8_longva.sampling_settings(max_new_tokens=12, temperature=0)
    session = Session(fp8_longva, [MediaSpec(path, 8, None)], keep_history=True, prefill_chunk=256)
    turns = [drive(session.ask(question, sampling)) for question in QUESTIONS]
    assert isinstance(session.runner.cache.layers[0], Float8KVLayer)
    assert all(turn.reused_tokens > 0 for turn in turns[1:])  # each turn continued the last one's cache
    assert len({turn.answer for turn in turns}) == len(turns)  # a mixed-up turn would show
    for i, (question, turn) in enumerate(zip(QUESTIONS, turns)):  # each turn against its own cold run
        cold = Session(fp8_longva, [MediaSpec(path, 8, None)], turns=session.turns[: 2 * i], keep_history=False, prefill_chunk=256)
        assert drive(cold.ask(question, sampling)).answer == turn.answer


def test_ask_kv_cache_fp8_answers_as_the_fp8_model_does(tiny_checkpoint, fp8_longva, video_file, monkeypatch, capsys):
    from longva_cli.cli import main

    monkeypatch.setattr(sys, "argv", ["longva", "ask", str(video_file), "What happens?", "--model", str(tiny_checkpoint), "--kv-cache", "fp8",
                                      "--temperature", "0", "--max-new-tokens", "10", "--json", "--no-cache"])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 0
    answer = json.loads(capsys.readouterr().out)
    expected = fp8_longva.ask(video_file, "What happens?", temperature=0, max_new_tokens=10)
    assert (answer["answer"], answer["generated_tokens"]) == (expected.answer, expected.generated_tokens)


def test_serve_keeps_its_follow_up_caches_in_fp8(tiny_checkpoint, monkeypatch):
    from longva_cli.serve import app
    from longva_cli.serve.settings import ServeSettings

    workers = []
    monkeypatch.setattr(app, "run_server", lambda start, *args: workers.append(start()))
    app.serve(str(tiny_checkpoint), ServeSettings(), device="cpu", kv_cache="fp8")
    worker = workers[0]
    try:
        config = worker.longva.model.config
        assert worker.runners.per_token == kv_bytes_per_token(config, FLOAT8)
        runner = worker.runners.acquire(build(worker.longva, ["Hello there."]))
        assert isinstance(runner.cache.layers[0], Float8KVLayer)
    finally:
        worker.close()
        worker.join(10)
