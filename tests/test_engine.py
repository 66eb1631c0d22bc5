"""The engine: cached and shared paths answer exactly as cold, independent runs do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longva_cli.engine import (
    Generate,
    MediaSpec,
    PrefixCache,
    RunnerPool,
    RunStore,
    SamplingSettings,
    Session,
    TeacherForce,
    VisualCache,
    build,
    drive,
    encode,
    prompt_parts,
    run,
    token_sequence,
)
from longva_cli.engine.objectives import Prefilling
from longva_cli.errors import LongVAError
from longva_cli.model.prompt import Turn, question_prompt

GREEDY = SamplingSettings(max_new_tokens=6, temperature=0)


def cold_answer(longva, media: list[MediaSpec], question: str, turns: list[Turn] | None = None) -> tuple[str, int]:
    """The greedy answer and its token count from a fresh session: no visual cache, an empty KV cache."""
    answer = drive(Session(longva, media, turns=turns, keep_history=False).ask(question, GREEDY))
    return answer.answer, answer.generated_tokens


def answered(answer) -> tuple[str, int]:
    return answer.answer, answer.generated_tokens


# ---- visual cache --------------------------------------------------------------------------------------


def test_a_cached_encoding_equals_a_cold_one_and_skips_decoding(tiny_longva, video_file, tmp_path, monkeypatch):
    from longva_cli.engine import encoder

    cache = VisualCache(tmp_path)
    spec = MediaSpec(video_file, frames=5)
    cold = drive(encode(tiny_longva, spec))
    first = drive(encode(tiny_longva, spec, cache))
    monkeypatch.setattr(encoder, "pixels", lambda *a, **k: pytest.fail("a cached video was decoded again"))
    second = drive(encode(tiny_longva, spec, VisualCache(tmp_path)))  # a new process would read the disk
    assert torch.equal(first.embeds, cold.embeds) and torch.equal(second.embeds, cold.embeds)
    assert second.frame_ids == cold.frame_ids and second.identity == first.identity


def test_the_cache_key_follows_content_not_the_file_name(tiny_longva, video_file, tmp_path):
    cache = VisualCache(tmp_path / "cache")
    copy = tmp_path / "renamed.mp4"
    copy.write_bytes(video_file.read_bytes())
    a = drive(encode(tiny_longva, MediaSpec(video_file, frames=3), cache))
    b = drive(encode(tiny_longva, MediaSpec(copy, frames=3), cache))
    c = drive(encode(tiny_longva, MediaSpec(video_file, frames=4), cache))
    assert a.identity == b.identity != c.identity
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2


def test_the_disk_cache_evicts_the_least_recently_used_entry(tiny_longva, video_file, tmp_path):
    cache = VisualCache(tmp_path, max_bytes=10**12)
    for frames in (2, 3, 4):
        drive(encode(tiny_longva, MediaSpec(video_file, frames=frames), cache))
    entries = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    sizes = {p: sum(f.stat().st_size for f in p.iterdir()) for p in entries}
    drive(encode(tiny_longva, MediaSpec(video_file, frames=2), cache))  # the oldest is used again
    newest = max(entries, key=lambda p: p.stat().st_mtime)
    cache.max_bytes = sum(sizes.values()) - min(sizes.values())  # room for all but one
    cache.evict(keep=None)
    left = {p for p in tmp_path.iterdir() if p.is_dir()}
    assert len(left) == 2 and newest in left


def test_a_frame_cap_on_fps_sampling_says_what_it_covered(tiny_longva, video_file):
    from longva_cli.engine import Notice

    events = []
    visual = drive(encode(tiny_longva, MediaSpec(video_file, frames=3, fps=5)), events.append)
    notices = [event.message for event in events if isinstance(event, Notice)]
    assert visual.frame_ids == [0, 14, 29]  # the whole 3-second clip, not its first 0.6 s
    assert notices == ["--fps 5 would take 15 frames; took 3 (--frames) spread over the whole video (0-3.0 s)."]


# ---- questions, chats, cancellations --------------------------------------------------------------------


def test_several_questions_share_one_prefill_and_answer_like_separate_runs(tiny_longva, video_file):
    media = [MediaSpec(video_file, frames=3)]
    session = Session(tiny_longva, media, keep_history=False)
    questions = ["What happens?", "What colour is the square?", "What happens?"]
    answers = [drive(session.ask(question, GREEDY)) for question in questions]
    assert [answered(a) for a in answers] == [cold_answer(tiny_longva, media, q) for q in questions]
    assert answers[0].reused_tokens == 0
    assert all(a.reused_tokens >= 3 * 144 for a in answers[1:])  # the video was prefilled once


def test_a_chat_turn_equals_a_one_shot_ask_with_the_same_history(tiny_longva, video_file):
    media = [MediaSpec(video_file, frames=3)]
    chat = Session(tiny_longva, media)
    first = drive(chat.ask("What happens?", GREEDY))
    second = drive(chat.ask("And then?", GREEDY))
    history = [Turn("user", "<image>\nWhat happens?"), Turn("assistant", first.answer)]
    assert answered(second) == cold_answer(tiny_longva, media, "And then?", turns=history)
    assert second.reused_tokens >= first.prompt_tokens  # only the new turn was prefilled
    assert [t.role for t in chat.turns] == ["user", "assistant", "user", "assistant"]


def test_stopping_a_prefill_midway_leaves_a_cache_that_still_answers_exactly(tiny_longva, video_file):
    visual = drive(encode(tiny_longva, MediaSpec(video_file, frames=4)))
    sequence = build(tiny_longva, prompt_parts(question_prompt("What happens?"), [visual]))
    runner = PrefixCache(tiny_longva.model.language_model, chunk=100)
    events = run(tiny_longva, runner, sequence, Generate(GREEDY))
    seen = next(events)
    assert isinstance(seen, Prefilling) and seen.done == 100
    events.close()  # the client went away: nothing more is computed
    assert len(runner) == 100 and runner.forwarded == 100
    resumed = drive(run(tiny_longva, runner, sequence, Generate(GREEDY)))
    fresh = drive(run(tiny_longva, PrefixCache(tiny_longva.model.language_model), sequence, Generate(GREEDY)))
    assert resumed.token_ids == fresh.token_ids and resumed.reused_tokens == 100


def test_the_runner_pool_hands_out_the_cache_with_the_longest_shared_prefix(tiny_longva, video_file):
    lm = tiny_longva.model.language_model
    video = drive(encode(tiny_longva, MediaSpec(video_file, frames=2)))
    image = drive(encode(tiny_longva, MediaSpec(video_file, frames=3)))
    pool = RunnerPool(lm, budget_bytes=10**12)
    about_video = build(tiny_longva, prompt_parts(question_prompt("Q1"), [video]))
    about_image = build(tiny_longva, prompt_parts(question_prompt("Q1"), [image]))
    for sequence in (about_video, about_image):
        drive(run(tiny_longva, pool.acquire(sequence), sequence, Generate(GREEDY)))
    follow_up = build(tiny_longva, prompt_parts(question_prompt("Another question"), [video]))
    runner = pool.acquire(follow_up)
    assert runner.shared_with(follow_up) > 2 * 144
    answer = drive(run(tiny_longva, runner, follow_up, Generate(GREEDY)))
    assert answer.token_ids == drive(run(tiny_longva, PrefixCache(lm), follow_up, Generate(GREEDY))).token_ids
    small = RunnerPool(lm, budget_bytes=pool.per_token * (len(about_video) + 10))
    small.acquire(about_video)
    drive(run(tiny_longva, small.runners[-1], about_video, Generate(GREEDY)))
    small.acquire(about_image)  # no room for both: the least recently used goes
    assert len(small.runners) == 1


def test_teacher_forcing_scores_equal_a_full_forward(tiny_longva):
    lm = tiny_longva.model.language_model
    ids = torch.randint(0, 400, (300,))
    targets = ids[-37:].tolist()
    scored = drive(run(tiny_longva, PrefixCache(lm, chunk=64), token_sequence(tiny_longva, ids.numpy()), TeacherForce(targets)))
    with torch.no_grad():
        logits = lm(input_ids=ids[None]).logits[0, -38:-1].float()
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(targets)[:, None]).sum()
    assert scored.count == 37 and scored.predicted_ids == logits.argmax(-1).tolist()
    assert scored.logprob == pytest.approx(float(expected), rel=1e-5)


# ---- run store -----------------------------------------------------------------------------------------


def test_a_run_store_resumes_and_refuses_other_settings_unless_overwrite(tmp_path):
    store = RunStore(tmp_path, "settings.json")
    store.open({"model": "a", "frames": 2}, overwrite=False, results=("items.jsonl",))
    store.append("items.jsonl", {"id": 1})
    with open(tmp_path / "items.jsonl", "a") as handle:
        handle.write('{"id": 2, "sc')  # a write cut by a kill
    store.open({"model": "a", "frames": 2}, overwrite=False, results=("items.jsonl",))
    store.append("items.jsonl", {"id": 3})
    assert store.read("items.jsonl") == [{"id": 1}, {"id": 3}]
    with pytest.raises(LongVAError, match="frames = 2, not 4.*--overwrite"):
        store.open({"model": "a", "frames": 4}, overwrite=False, results=("items.jsonl",))
    store.open({"model": "a", "frames": 4}, overwrite=True, results=("items.jsonl",))
    assert store.read("items.jsonl") == []


# ---- loading --------------------------------------------------------------------------------------------


def test_a_mistyped_checkpoint_folder_names_the_nearest_ones(tiny_checkpoint, tmp_path, monkeypatch):
    from longva_cli.hub import locate_model

    runs = tmp_path / "runs" / "align-tiny"
    for step in ("step_8", "step_16"):
        (runs / step).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(tiny_checkpoint, runs / step)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LongVAError, match=r"no such folder runs/align-tiny/step_99; nearest checkpoints: runs/align-tiny/step_"):
        locate_model("runs/align-tiny/step_99")
    with pytest.raises(LongVAError, match=r"no such folder runs/align-tiny-typo; nearest checkpoints: runs/align-tiny"):
        locate_model("runs/align-tiny-typo")
    assert locate_model("runs/align-tiny/step_8") == Path("runs/align-tiny/step_8")


def test_a_longva_checkpoint_loads_as_a_causal_lm(tiny_checkpoint, tiny_longva):
    from longva_cli.engine import load

    text = load(str(tiny_checkpoint), kind="causal-lm", device="cpu")
    ids = torch.arange(20)[None]
    with torch.no_grad():
        torch.testing.assert_close(text.language_model(input_ids=ids).logits, tiny_longva.model.language_model(input_ids=ids).logits)


# ---- the command line ---------------------------------------------------------------------------------


def longva(*args: str, stdin: str | None = None, cache: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"XDG_CACHE_HOME": str(cache)} if cache else {})}
    return subprocess.run([sys.executable, "-m", "longva_cli", *args], input=stdin, capture_output=True, text=True, timeout=300, env=env)


def test_ask_answers_several_questions_as_json_lines_and_reuses_the_disk_cache(tiny_checkpoint, video_file, tmp_path):
    (tmp_path / "questions.txt").write_text("What happens?\n\nWhy?\n")
    common = ("--model", str(tiny_checkpoint), "-t", "0", "--max-new-tokens", "4", "--frames", "3")
    first = longva("ask", str(video_file), "Who?", "--questions", str(tmp_path / "questions.txt"), "--json", *common, cache=tmp_path)
    assert first.returncode == 0, first.stderr
    lines = [json.loads(line) for line in first.stdout.splitlines()]
    assert [line["question"] for line in lines] == ["Who?", "What happens?", "Why?"]
    assert lines[0]["reused_tokens"] == 0 and all(line["reused_tokens"] >= 3 * 144 for line in lines[1:])
    again = longva("ask", str(video_file), "Who?", "--json", *common, cache=tmp_path)
    assert json.loads(again.stdout)["answer"] == lines[0]["answer"]
    plain = longva("ask", str(video_file), "Who?", "Why?", *common, "--no-cache", cache=tmp_path)
    assert plain.stdout.startswith("Q: Who?\nA: ") and "\n\nQ: Why?\nA: " in plain.stdout


def test_chat_keeps_the_history_and_saves_it(tiny_checkpoint, video_file, tmp_path):
    saved = tmp_path / "chat.json"
    script = f"What happens?\nAnd then?\n/save {saved}\n/reset\n/nonsense\nAgain?\n"
    result = longva("chat", str(video_file), "--model", str(tiny_checkpoint), "-t", "0", "--max-new-tokens", "3", "--json",
                    stdin=script, cache=tmp_path)
    assert result.returncode == 0, result.stderr
    turns = [json.loads(line) for line in result.stdout.splitlines()]
    assert [t["question"] for t in turns] == ["What happens?", "And then?", "Again?"]
    assert turns[1]["reused_tokens"] >= turns[0]["prompt_tokens"]  # the first turn stayed in the KV cache
    record = json.loads(saved.read_text())
    assert [t["role"] for t in record["turns"]] == ["user", "assistant", "user", "assistant"]
    assert record["turns"][0]["text"] == "<image>\nWhat happens?"
    assert "unknown command /nonsense" in result.stderr


def test_an_empty_answer_is_said_on_stderr(tiny_longva, tiny_checkpoint, video_file, monkeypatch, capsys):
    from longva_cli import ask

    visual = drive(encode(tiny_longva, MediaSpec(video_file, frames=2)))
    sequence = build(tiny_longva, prompt_parts(question_prompt("Q?"), [visual]))
    first_token = drive(run(tiny_longva, PrefixCache(tiny_longva.model.language_model), sequence, Generate(GREEDY))).token_ids[0]
    monkeypatch.setattr(ask, "load_model", lambda *a, **k: tiny_longva)
    monkeypatch.setattr(tiny_longva, "stop_ids", {*tiny_longva.stop_ids, first_token})
    settings = ask.AskSettings(model=str(tiny_checkpoint), device="cpu", frames=2, temperature=0, max_new_tokens=4, use_cache=False)
    answers = ask.ask(video_file, ["Q?"], settings)  # (the memory plan reads the checkpoint's config)
    assert answers[0].answer == ""
    assert "ended its answer at once" in capsys.readouterr().err
