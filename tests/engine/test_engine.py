"""The engine: cached and shared paths answer exactly as cold, independent runs do."""

from __future__ import annotations

import json
import os
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
from support.cli import longva

GREEDY = SamplingSettings(max_new_tokens=6, temperature=0)


def cold_answer(longva, media: list[MediaSpec], question: str, turns: list[Turn] | None = None) -> tuple[str, int]:
    """The greedy answer and its token count from a fresh session: no visual cache, an empty KV cache."""
    answer = drive(Session(longva, media, turns=turns, keep_history=False).ask(question, GREEDY))
    return answer.answer, answer.generated_tokens


def answered(answer) -> tuple[str, int]:
    return answer.answer, answer.generated_tokens


# ---- the one engine call -------------------------------------------------------------------------------


def test_the_engine_call_answers_as_the_steps_written_out_do(tiny_longva, video_file, image_file):
    from longva_cli.engine.answering import Built, Request, answer

    media = [MediaSpec(video_file, frames=3), MediaSpec(image_file)]
    for question in ("What happens?", "Which colour is the square?"):
        visuals = [drive(encode(tiny_longva, spec)) for spec in media]
        prompt = question_prompt("<image>\n" + question)  # the placeholders open the question, one per item
        by_hand = drive(run(tiny_longva, PrefixCache(tiny_longva.model.language_model), build(tiny_longva, prompt_parts(prompt, visuals)), Generate(GREEDY)))
        events = []
        answered = drive(answer(tiny_longva, Request([Turn("user", question)], Generate(GREEDY), media), PrefixCache(tiny_longva.model.language_model)), events.append)
        assert (answered.result.text, answered.result.token_ids) == (by_hand.text, by_hand.token_ids)
        built = next(i for i, event in enumerate(events) if isinstance(event, Built))
        assert events[built].tokens == answered.prompt_tokens == by_hand.prompt_tokens
        assert not any(isinstance(event, Prefilling) for event in events[:built])  # Built comes before any prefill
    # Teacher forcing the greedy answer after the same prompt: every answer token is the argmax.
    scored = drive(answer(tiny_longva, Request([Turn("user", question)], TeacherForce(by_hand.token_ids), media), PrefixCache(tiny_longva.model.language_model)))
    assert scored.result.greedy and scored.prompt_tokens == by_hand.prompt_tokens + len(by_hand.token_ids)


def test_the_engine_call_names_the_media_item_it_cannot_read(tiny_longva, video_file, tmp_path):
    from longva_cli.engine.answering import MediaError, Request, answer

    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(64))
    request = Request([Turn("user", "What happens?")], Generate(GREEDY), [MediaSpec(video_file, frames=2), MediaSpec(broken, frames=2)])
    with pytest.raises(MediaError) as refused:
        drive(answer(tiny_longva, request, PrefixCache(tiny_longva.model.language_model)))
    assert refused.value.index == 1 and "broken.mp4" in str(refused.value)


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
    assert len(cache.entries()) == 2


def test_the_disk_cache_evicts_the_least_recently_used_entry(tiny_longva, video_file, tmp_path):
    cache = VisualCache(tmp_path, max_bytes=10**12)
    for frames in (2, 3, 4):
        drive(encode(tiny_longva, MediaSpec(video_file, frames=frames), cache))
    entries = cache.entries()
    sizes = {p: sum(f.stat().st_size for f in p.iterdir()) for p in entries}
    drive(encode(tiny_longva, MediaSpec(video_file, frames=2), cache))  # the oldest is used again
    newest = max(entries, key=lambda p: p.stat().st_mtime)
    cache.max_bytes = sum(sizes.values()) - min(sizes.values())  # room for all but one
    cache.evict(keep=None)
    left = set(cache.entries())
    assert len(left) == 2 and newest in left


def test_a_frame_cap_on_fps_sampling_says_what_it_covered(tiny_longva, video_file):
    from longva_cli.engine import Notice

    events = []
    visual = drive(encode(tiny_longva, MediaSpec(video_file, frames=3, fps=5)), events.append)
    notices = [event.message for event in events if isinstance(event, Notice)]
    assert visual.frame_ids == [0, 14, 29]  # the whole 3-second clip, not its first 0.6 s
    assert notices == ["--fps 5 would take 15 frames; took 3 (--frames) spread over the whole video (0-3.0 s)."]


def a_finished_process_id() -> int:
    """The id of a process that has exited (as a crashed cache writer has)."""
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)
    return child


def test_eviction_never_deletes_folders_the_cache_did_not_write(tiny_longva, video_file, tmp_path, monkeypatch):
    """`--cache-dir ~/work` with a tiny budget deleted thesis/ and photos/: only the cache's own entries go."""
    from longva_cli.engine.visual_cache import KEY_FILE, key_digest

    work = tmp_path / "work"
    for name in ("thesis", "photos", "a" * 64, "b" * 24, key_digest({"other": 1})):
        (work / name).mkdir(parents=True)
        (work / name / "chapter.txt").write_text("years of work")
    (work / key_digest({"other": 1}) / KEY_FILE).write_text(json.dumps({"not": "the key of this folder"}))
    (work / ("c" * 64)).symlink_to(work / "thesis")
    cache = VisualCache(work, max_bytes=1)
    first = drive(encode(tiny_longva, MediaSpec(video_file, frames=2), cache))
    drive(encode(tiny_longva, MediaSpec(video_file, frames=3), cache))  # evicts the first entry, keeps its own
    assert len(cache.entries()) == 1
    cache.evict()
    assert cache.entries() == []
    user_folders = sorted(p.name for p in work.iterdir() if p.name != "hashes")
    assert user_folders == sorted(["thesis", "photos", "a" * 64, "b" * 24, key_digest({"other": 1}), "c" * 64])
    assert all((work / name / "chapter.txt").read_text() == "years of work" for name in user_folders)
    assert drive(encode(tiny_longva, MediaSpec(video_file, frames=2), cache)).identity == first.identity


@pytest.mark.parametrize("budget", ["-1", "0", "nan", "inf", "abc", ""])
def test_an_impossible_cache_budget_is_refused_in_one_sentence(budget, tmp_path, monkeypatch):
    monkeypatch.setenv("LONGVA_CACHE_MAX_GB", budget)
    with pytest.raises(LongVAError, match=r"^LONGVA_CACHE_MAX_GB must be a finite number above 0, got .*disk budget in GiB.*unset it\.$"):
        VisualCache(tmp_path)
    monkeypatch.setenv("LONGVA_CACHE_MAX_GB", "0.5")
    assert VisualCache(tmp_path).max_bytes == 2**29


def test_two_files_that_differ_outside_sampled_blocks_have_different_cache_keys(tmp_path):
    """Two 37 MB files that differ only between the 1 MiB blocks the old hash sampled shared one entry."""
    from longva_cli.engine.visual_cache import content_hash

    size = 37 * 10**6
    first, second = tmp_path / "a.mp4", tmp_path / "b.mp4"
    data = bytearray(size)
    first.write_bytes(data)
    data[size // 31] = 1  # inside none of the sixteen evenly spaced 1 MiB blocks
    second.write_bytes(data)
    assert content_hash(first) != content_hash(second)
    assert VisualCache(tmp_path / "cache").file_hash(first) != VisualCache(tmp_path / "cache").file_hash(second)


def test_a_remembered_hash_is_reused_but_never_matches_a_changed_file(tmp_path, monkeypatch):
    from longva_cli.engine import visual_cache

    monkeypatch.setattr(visual_cache, "SETTLE_NS", 0)  # the file is settled as soon as it was written
    video = tmp_path / "movie.mp4"
    video.write_bytes(b"frames " * 1000)
    before = video.stat()
    digest = VisualCache(tmp_path / "cache").file_hash(video)
    real_hash = visual_cache.content_hash
    monkeypatch.setattr(visual_cache, "content_hash", lambda path: pytest.fail("a remembered file was read again"))
    assert VisualCache(tmp_path / "cache").file_hash(video) == digest  # a new process reads the memo
    video.write_bytes(b"FRAMES " * 1000)  # same size, then the old times put back
    os.utime(video, ns=(before.st_atime_ns, before.st_mtime_ns))
    monkeypatch.setattr(visual_cache, "content_hash", real_hash)
    assert VisualCache(tmp_path / "cache").file_hash(video) == real_hash(video) != digest


def test_a_memory_only_cache_remembers_the_hashes_of_the_latest_files_only(tmp_path, monkeypatch):
    """A server sees many files: its in-memory hashes stay bounded, oldest out first."""
    from longva_cli.engine import visual_cache

    monkeypatch.setattr(visual_cache, "SETTLE_NS", 0)
    monkeypatch.setattr(visual_cache, "MAX_REMEMBERED_HASHES", 2)
    files = [tmp_path / f"{n}.mp4" for n in range(3)]
    for n, file in enumerate(files):
        file.write_bytes(bytes([n]) * 100)
    cache = VisualCache()  # no folder, as `serve` has
    for file in files:
        cache.file_hash(file)
    read = []
    real_hash = visual_cache.content_hash
    monkeypatch.setattr(visual_cache, "content_hash", lambda path: read.append(path.name) or real_hash(path))
    cache.file_hash(files[2])
    cache.file_hash(files[0])
    assert read == ["0.mp4"]


def test_a_full_disk_during_a_cache_write_answers_without_the_cache(tiny_longva, video_file, tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a block")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    cache = VisualCache(tmp_path)
    spec = MediaSpec(video_file, frames=3)
    events = []
    visual = drive(encode(tiny_longva, spec, cache), events.append)
    from longva_cli.engine import Notice

    notices = [event.message for event in events if isinstance(event, Notice)]
    assert notices == [f"could not write the visual cache in {tmp_path} (No space left on device); this answer is computed without it."]
    assert torch.equal(visual.embeds, drive(encode(tiny_longva, spec)).embeds)
    assert not list(tmp_path.rglob(".partial-*")) and not list(tmp_path.rglob("frames-*"))


def test_partial_blocks_left_by_a_crashed_writer_are_cleaned(tiny_longva, video_file, tmp_path):
    cache = VisualCache(tmp_path)
    drive(encode(tiny_longva, MediaSpec(video_file, frames=2), cache))
    [entry] = cache.entries()
    crashed = entry / f".partial-{a_finished_process_id()}-000000.safetensors"
    writing = entry / f".partial-{os.getpid()}-000002.safetensors"  # a live writer's: kept
    crashed.write_bytes(b"x" * 1000)
    writing.write_bytes(b"x")
    cache.evict()
    assert not crashed.exists() and writing.exists()


@pytest.mark.parametrize("damage", ["flipped bytes", "NaN"])
def test_a_tampered_cache_block_is_dropped_and_recomputed(damage, tiny_longva, video_file, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from longva_cli.engine import Notice

    cache = VisualCache(tmp_path)
    spec = MediaSpec(video_file, frames=3)
    cold = drive(encode(tiny_longva, spec, cache))
    [entry] = cache.entries()
    [block] = entry.glob("frames-*.safetensors")
    if damage == "flipped bytes":
        data = bytearray(block.read_bytes())
        data[-100:] = bytes(255 - b for b in data[-100:])
        block.write_bytes(bytes(data))
    else:
        with safe_open(str(block), framework="pt") as handle:
            metadata, embeds = handle.metadata(), handle.get_tensor("embeds")
        embeds[0, 0, 0] = float("nan")
        save_file({"embeds": embeds}, str(block), metadata=metadata)
    events = []
    again = drive(encode(tiny_longva, spec, VisualCache(tmp_path)), events.append)
    assert [e.message for e in events if isinstance(e, Notice)] == [
        f"the visual cache block {block} does not match its checksum; it was deleted and will be computed again."
    ]
    assert torch.equal(again.embeds, cold.embeds)
    events.clear()
    assert torch.equal(drive(encode(tiny_longva, spec, VisualCache(tmp_path)), events.append).embeds, cold.embeds)
    assert events == []  # the recomputed block is whole again


# ---- questions, chats, cancellations --------------------------------------------------------------------


def test_several_questions_share_one_prefill_and_answer_like_separate_runs(tiny_longva, video_file):
    media = [MediaSpec(video_file, frames=3)]
    session = Session(tiny_longva, media, keep_history=False)
    questions = ["What happens?", "What colour is the square?", "What happens?"]
    answers = [drive(session.ask(question, GREEDY)) for question in questions]
    assert [answered(a) for a in answers] == [cold_answer(tiny_longva, media, q) for q in questions]
    assert answers[0].answer != answers[1].answer  # so a runner answering the previous question would fail
    assert answers[0].reused_tokens == 0
    assert all(a.reused_tokens >= 3 * 144 for a in answers[1:])  # the video was prefilled once


def test_a_chat_turn_equals_a_one_shot_ask_with_the_same_history(tiny_longva, video_file):
    media = [MediaSpec(video_file, frames=3)]
    chats = {opening: Session(tiny_longva, media) for opening in ("What happens?", "What colour is the square?")}
    firsts = {opening: drive(chat.ask(opening, GREEDY)) for opening, chat in chats.items()}
    seconds = {opening: drive(chat.ask("And then?", GREEDY)) for opening, chat in chats.items()}  # interleaved
    for opening, chat in chats.items():
        history = [Turn("user", "<image>\n" + opening), Turn("assistant", firsts[opening].answer)]
        assert answered(seconds[opening]) == cold_answer(tiny_longva, media, "And then?", turns=history)
        assert seconds[opening].reused_tokens >= firsts[opening].prompt_tokens  # only the new turn was prefilled
        assert [t.role for t in chat.turns] == ["user", "assistant", "user", "assistant"]
    assert len({second.answer for second in seconds.values()}) == 2  # the same question, answered after other turns


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
    answers = []
    for question, visual in (("Another question", video), ("What colour is the square?", image)):
        follow_up = build(tiny_longva, prompt_parts(question_prompt(question), [visual]))
        runner = pool.acquire(follow_up)
        assert runner.shared_with(follow_up) > len(visual)
        answers.append(drive(run(tiny_longva, runner, follow_up, Generate(GREEDY))).token_ids)
        assert answers[-1] == drive(run(tiny_longva, PrefixCache(lm), follow_up, Generate(GREEDY))).token_ids
    assert answers[0] != answers[1]
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


@pytest.mark.parametrize(
    "damage",
    [
        b'{"id": 2, "sc',  # a torn tail (a kill)
        bytes(i for i in range(256) if i != 10) + b"\x00\xff" * 22 + b"\x00",  # 300 bytes of binary garbage, no newline (a torn write)
        b"\xe9t\xe9\n",  # a line that is not UTF-8
        b"[1, 2]\n",  # JSON that is not an object
        b'{"score": 1}\n',  # an object without the run's fields
    ],
)
def test_a_results_file_with_damaged_lines_resumes_with_every_good_line_kept(damage, tmp_path, capsys):
    store = RunStore(tmp_path, "settings.json", fields={"items.jsonl": ("id",)})
    store.open({"model": "a"}, overwrite=False, results=("items.jsonl",))
    store.append("items.jsonl", {"id": 1})
    with open(tmp_path / "items.jsonl", "ab") as handle:
        handle.write(damage)
    if damage.endswith(b"\n"):  # a damaged line in the middle: the lines after it count too
        store.append("items.jsonl", {"id": 2})
    capsys.readouterr()
    store.open({"model": "a"}, overwrite=False, results=("items.jsonl",))
    side = tmp_path / "items.jsonl.damaged"
    assert capsys.readouterr().err == f"warning: set aside 1 damaged line of {tmp_path / 'items.jsonl'} into {side}; what it held will be computed again.\n"
    assert side.read_bytes() == (damage if damage.endswith(b"\n") else damage + b"\n")
    store.append("items.jsonl", {"id": 3})
    kept = [1, 2, 3] if damage.endswith(b"\n") else [1, 3]
    assert [record["id"] for record in store.read("items.jsonl")] == kept
    store.open({"model": "a"}, overwrite=False, results=("items.jsonl",))
    assert capsys.readouterr().err == ""  # nothing left to set aside
    store.open({"model": "a"}, overwrite=True, results=("items.jsonl",))
    assert not side.exists() and store.read("items.jsonl") == []


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


@pytest.mark.integration
def test_ask_answers_several_questions_as_json_lines_and_reuses_the_disk_cache(tiny_checkpoint, video_file, tmp_path):
    (tmp_path / "questions.txt").write_text("What happens?\n\nWhy?\n")
    common = ("--model", str(tiny_checkpoint), "-t", "0", "--max-new-tokens", "4", "--frames", "3")
    first = longva("ask", str(video_file), "Who?", "--questions", str(tmp_path / "questions.txt"), "--json", *common, env={"XDG_CACHE_HOME": str(tmp_path)})
    assert first.returncode == 0, first.stderr
    lines = [json.loads(line) for line in first.stdout.splitlines()]
    assert [line["question"] for line in lines] == ["Who?", "What happens?", "Why?"]
    assert lines[0]["reused_tokens"] == 0 and all(line["reused_tokens"] >= 3 * 144 for line in lines[1:])
    assert len({line["answer"] for line in lines}) == 3  # each question its own answer, so `again` below tells them apart
    again = longva("ask", str(video_file), "Who?", "--json", *common, env={"XDG_CACHE_HOME": str(tmp_path)})
    assert json.loads(again.stdout)["answer"] == lines[0]["answer"]
    plain = longva("ask", str(video_file), "Who?", "Why?", *common, "--no-cache", env={"XDG_CACHE_HOME": str(tmp_path)})
    assert plain.stdout.startswith("Q: Who?\nA: ") and "\n\nQ: Why?\nA: " in plain.stdout


def test_chat_keeps_the_history_and_saves_it(tiny_checkpoint, video_file, tmp_path, monkeypatch, longva_main):
    saved = tmp_path / "chat.json"
    script = f"What happens?\nAnd then?\n/save {saved}\n/reset\n/nonsense\nAgain?\n"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    result = longva_main("chat", str(video_file), "--model", str(tiny_checkpoint), "-t", "0", "--max-new-tokens", "3", "--json", stdin=script)
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


def test_a_failed_chat_save_is_one_line_and_the_chat_goes_on(tiny_longva, tiny_checkpoint, video_file, tmp_path, monkeypatch, capsys):
    """/save to a folder, a missing folder, /dev/full or a full disk ended the chat; a file was overwritten silently."""
    import errno
    import io

    from longva_cli import ask, chat

    existing = tmp_path / "earlier.json"
    existing.write_text('{"kept": true}\n')
    real_write_bytes = Path.write_bytes

    def disk_fills_up_for_full_json(self, data):
        if self.name.startswith(".full.json."):  # the temporary file of `/save full.json`
            real_write_bytes(self, data[:5])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", disk_fills_up_for_full_json)
    script = [
        f"/save {tmp_path}", f"/save {tmp_path / 'missing' / 'chat.json'}", "/save /dev/full", "/save! /dev/full",
        "What happens?", f"/save {existing}", f"/save {tmp_path / 'full.json'}", "And then?", f"/save! {existing}",
    ]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(script) + "\n"))
    monkeypatch.setattr(ask, "load_model", lambda *a, **k: tiny_longva)
    settings = ask.AskSettings(model=str(tiny_checkpoint), frames=2, temperature=0, max_new_tokens=3, use_cache=False)
    turns = chat.chat(video_file, settings, json_output=True)  # the memory plan reads the checkpoint's config
    assert turns == 2
    said = " ".join(capsys.readouterr().err.split())  # rich may wrap long lines
    expected = [
        f"not saved: {tmp_path} is a folder; give a file name, such as {tmp_path / 'chat.json'}.",
        f"not saved: the folder {tmp_path / 'missing'} does not exist; create it or give another path.",
        "not saved: /dev/full is not a regular file; give the path of a file.",
        "not saved: /dev/full is not a regular file; give the path of a file.",  # /save! too: never a device
        f"not saved: {existing} already exists; /save! {existing} replaces it.",
        f"not saved: could not write {tmp_path / 'full.json'} (No space left on device); nothing was written there.",
        f"saved 2 turns to {existing}",
    ]
    positions = [said.find(" ".join(line.split())) for line in expected]
    assert -1 not in positions and positions == sorted(positions), said
    assert said.count("/dev/full is not a regular file") == 2
    assert not (tmp_path / "full.json").exists() and not list(tmp_path.glob(".*.tmp"))
    assert [turn["role"] for turn in json.loads(existing.read_text())["turns"]] == ["user", "assistant"] * 2


def test_a_huge_chat_line_is_skipped_and_the_chat_goes_on(tiny_longva, tiny_checkpoint, video_file, monkeypatch, capsys):
    """A 10 MB line is read no further than a question may be long, refused, and the next turn answered."""
    import io

    from longva_cli import ask, chat

    monkeypatch.setattr(sys, "stdin", io.StringIO("x" * 10_000_000 + "\nWhat happens?\n"))
    monkeypatch.setattr(ask, "load_model", lambda *a, **k: tiny_longva)
    settings = ask.AskSettings(model=str(tiny_checkpoint), frames=2, temperature=0, max_new_tokens=3, use_cache=False)
    turns = chat.chat(video_file, settings, json_output=True)  # the memory plan reads the checkpoint's config
    assert turns == 1
    assert "skipped: this line has more than the 1,000,000 characters a question may have" in " ".join(capsys.readouterr().err.split())
