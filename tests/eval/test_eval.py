"""`longva eval`: local multiple-choice scoring, resume, the degenerate guard, and lmms-eval wiring."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from support.cli import fail_after
from support.media import write_video

from longva_cli.errors import LongVAError
from longva_cli.eval import LMMS_CLASS_PATH, LMMS_MODEL_ID
from longva_cli.eval.answers import DegenerateGuard, degenerate_kind, extract_letter
from longva_cli.eval.local import (
    build_question,
    evaluate_local,
    load_samples,
    summarize,
)

OPTIONS = ["A. A red car", "B. A blue bus", "C. Two dogs", "D. Nobody"]

VIDEOMME_ROWS = [
    # video 001 (mp4): three questions, as in Video-MME
    dict(video_id="001", duration="short", domain="Sports", sub_category="Football", url="u", videoID="vidMP4",
         question_id="001-1", task_type="Counting Problem", question="How many players?", options=OPTIONS, answer="A"),
    dict(video_id="001", duration="short", domain="Sports", sub_category="Football", url="u", videoID="vidMP4",
         question_id="001-2", task_type="Object Recognition", question="What moves?", options=OPTIONS, answer="B"),
    dict(video_id="001", duration="short", domain="Sports", sub_category="Football", url="u", videoID="vidMP4",
         question_id="001-3", task_type="Counting Problem", question="How many balls?", options=OPTIONS, answer="C"),
    # video 002 (mkv): two questions
    dict(video_id="002", duration="long", domain="Film", sub_category="Drama", url="u", videoID="vidMKV",
         question_id="002-1", task_type="Action Reasoning", question="Why does it stop?", options=OPTIONS, answer="D"),
    dict(video_id="002", duration="long", domain="Film", sub_category="Drama", url="u", videoID="vidMKV",
         question_id="002-2", task_type="Object Recognition", question="What is red?", options=OPTIONS, answer="A"),
    # video 003 is not on disk: skipped with a reason, not a crash
    dict(video_id="003", duration="medium", domain="Film", sub_category="Drama", url="u", videoID="vidGONE",
         question_id="003-1", task_type="Action Reasoning", question="Who left?", options=OPTIONS, answer="B"),
]


@pytest.fixture(scope="module")
def videomme_folder(tmp_path_factory) -> Path:
    """A Video-MME-shaped folder: annotation parquet at the root, data/ with one .mp4 and one .mkv."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("Video-MME")
    (root / "data").mkdir()
    write_video(root / "data" / "vidMP4.mp4", frames=12, width=96, height=64)
    write_video(root / "data" / "vidMKV.mkv", frames=12, width=96, height=64)
    pq.write_table(pa.Table.from_pylist(VIDEOMME_ROWS), root / "test-00000-of-00001.parquet")
    return root


def run_cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "160"}
    return subprocess.run([sys.executable, "-m", "longva_cli", *args], check=False, capture_output=True, text=True, timeout=timeout, env=env)


# ---- end to end ----------------------------------------------------------------------------------


@pytest.mark.integration
def test_local_videomme_folder_end_to_end(videomme_folder, tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    done = run_cli("eval", "local", "--data", str(videomme_folder), "--model", str(tiny_checkpoint), "--frames", "4",
                   "--max-new-tokens", "3", "--device", "cpu", "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    results = json.loads((out / "results.json").read_text())
    summary = results["summary"]
    assert summary["overall"]["total"] == 5 and summary["skipped"] == 1
    assert set(summary["duration"]) == {"short", "long"}
    assert set(summary["category"]) == {"Counting Problem", "Object Recognition", "Action Reasoning"}
    assert results["skipped"] == [{"id": "003-1", "video": "data/vidGONE.mp4", "reason": "video data/vidGONE.mp4 not found"}]
    assert results["status"] == "complete"
    run = results["run"]
    assert run["frames"] == 4 and run["dtype"] == "float32" and run["date"]
    assert {"longva", "torch", "transformers"} <= set(run["versions"]) and all(run["versions"].values())
    lines = (out / "samples.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["id"] for r in records] == ["001-1", "001-2", "001-3", "002-1", "002-2", "003-1"]
    assert all(r["frames"] == 4 for r in records if r["status"] == "ok")
    assert "overall" in done.stdout and "vidGONE" in done.stderr


def test_generic_jsonl_questions(tiny_longva, tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    write_video(clips / "a.mp4", frames=8, width=96, height=64)
    rows = [
        {"id": "q1", "video": "clips/a.mp4", "question": "Colour?", "options": ["red", "blue", "green"], "answer": "B", "category": "colour"},
        {"video": "clips/a.mp4", "question": "Count?", "options": ["one", "two"], "answer": "a", "category": "count"},
    ]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    samples, _ = load_samples(data)
    assert samples[0].options == ["A. red", "B. blue", "C. green"]
    assert samples[1].id == "2" and samples[1].answer == "A"
    assert "Respond with only the letter (A, B, or C) of the correct option.\nColour?\nA. red\nB. blue\nC. green\nThe best answer is:" in build_question(samples[0])
    results = evaluate_local(data, model=tiny_longva, frames=2, max_new_tokens=2, output=tmp_path / "out")
    assert results["summary"]["overall"]["total"] == 2
    assert set(results["summary"]["category"]) == {"colour", "count"}


def test_videomme_prompt_is_the_benchmark_text(videomme_folder):
    samples, _ = load_samples(videomme_folder)
    assert build_question(samples[0]) == (
        "Select the best answer to the following multiple-choice question based on the video. "
        "Respond with only the letter (A, B, C, or D) of the correct option.\n"
        "How many players?\nA. A red car\nB. A blue bus\nC. Two dogs\nD. Nobody\nThe best answer is:"
    )


# ---- resume and the per-video cache -----------------------------------------------------------------


def counting(monkeypatch, longva):
    """Count the engine's encodings and generations (by the names the counts had before the engine),
    where the one engine call looks them up."""
    from longva_cli.engine import answering

    calls = {"encode_video": 0, "generate_text": 0}
    for label, module, name in (("encode_video", answering, "encode"), ("generate_text", answering, "run")):
        original = getattr(module, name)

        def wrapper(*args, _original=original, _label=label, **kwargs):
            calls[_label] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)
    return calls


def test_each_video_is_encoded_once_and_a_rerun_recomputes_nothing(videomme_folder, tiny_longva, tmp_path, monkeypatch):
    calls = counting(monkeypatch, tiny_longva)
    first = evaluate_local(videomme_folder, model=tiny_longva, frames=2, max_new_tokens=2, output=tmp_path)
    assert calls == {"encode_video": 2, "generate_text": 5}  # 2 videos on disk, 5 questions about them
    second = evaluate_local(videomme_folder, model=tiny_longva, frames=2, max_new_tokens=2, output=tmp_path)
    assert calls == {"encode_video": 2, "generate_text": 5}
    assert second["summary"] == first["summary"]


def test_ctrl_c_on_the_command_line_says_how_many_answers_are_saved(videomme_folder, tiny_checkpoint, tmp_path, monkeypatch, longva_main):
    from longva_cli.eval import local

    fail_after(monkeypatch, local, "answer_one", 2)
    command = ["eval", "local", "--data", videomme_folder, "--model", tiny_checkpoint, "--device", "cpu", "--frames", "2",
               "--max-new-tokens", "2", "--output", tmp_path / "run", "--no-cache"]
    stopped = longva_main(*command)
    assert stopped.returncode == 130 and stopped.stdout == ""
    again = "longva " + " ".join(map(str, command))
    assert stopped.stderr.splitlines()[-1] == (
        f"interrupted: 2 answers are saved in {tmp_path / 'run' / 'samples.jsonl'}; run the same command to continue: {again}"
    )


def test_resume_drops_a_half_written_line_and_refuses_other_settings(videomme_folder, tiny_longva, tmp_path):
    evaluate_local(videomme_folder, model=tiny_longva, frames=2, max_new_tokens=2, output=tmp_path, limit=2)
    with open(tmp_path / "samples.jsonl", "ab") as handle:
        handle.write(b'{"id": "001-2"}\n{"id": "001-3", "status": "o\xff\xfe')  # a line without results, then a crash mid-write
    results = evaluate_local(videomme_folder, model=tiny_longva, frames=2, max_new_tokens=2, output=tmp_path, limit=3)
    assert results["summary"]["overall"]["total"] == 3
    assert all(json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines())
    assert (tmp_path / "samples.jsonl.damaged").read_bytes() == b'{"id": "001-2"}\n{"id": "001-3", "status": "o\xff\xfe\n'
    with pytest.raises(LongVAError, match="frames = 2"):
        evaluate_local(videomme_folder, model=tiny_longva, frames=3, output=tmp_path)


# ---- scoring arithmetic ------------------------------------------------------------------------------


def test_accuracy_overall_and_by_group_from_known_predictions():
    def record(correct, duration, category, status="ok"):
        return {"status": status, "correct": correct, "duration": duration, "category": category, "domain": None}

    records = [
        record(True, "short", "count"), record(True, "short", "ocr"), record(False, "short", "count"),
        record(True, "long", "count"), record(False, "long", "ocr"),
        record(False, "long", "ocr", status="skipped"),  # not counted as wrong
    ]
    summary = summarize(records)
    assert summary["overall"] == {"correct": 3, "total": 5, "accuracy": 60.0}
    assert summary["duration"] == {"long": {"correct": 1, "total": 2, "accuracy": 50.0},
                                   "short": {"correct": 2, "total": 3, "accuracy": 66.67}}
    assert summary["category"]["count"] == {"correct": 2, "total": 3, "accuracy": 66.67}
    assert summary["skipped"] == 1 and "domain" not in summary


# ---- letter extraction ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, letter",
    [
        ("B", "B"),
        ("b", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("C) Two dogs", "C"),
        ("Option C", "C"),
        ("option d.", "D"),
        ("The best answer is: A", "A"),
        ("The best answer is (D).", "D"),
        ("Answer: C", "C"),
        ("The correct answer is B. A blue bus", "B"),
        ("I think it's D", "D"),
        ("At the end the answer is C", "C"),  # the old harness read the "A" of "At"
        ("A blue bus", "B"),  # an option's text, word for word
        ("two dogs.", "C"),
        ("**A**", "A"),
        ("", None),
        ("!!!!!!!!", None),
        ("I don't know", None),
        ("E", None),  # not among four options
    ],
)
def test_letter_extraction(response, letter):
    assert extract_letter(response, OPTIONS) == letter


def test_degenerate_kinds():
    assert degenerate_kind("", None) == "empty"
    assert degenerate_kind("!!!!!!", None) == "repeated punctuation"
    assert degenerate_kind("aaaaaaa", None) == "repeated character"
    assert degenerate_kind("I cannot tell", None) == "unparseable"
    assert degenerate_kind("I cannot tell", None, multiple_choice=False) is None
    assert degenerate_kind("B", "B") is None


def test_guard_trips_past_the_share_after_enough_samples():
    guard = DegenerateGuard(threshold=0.3, min_samples=10)
    for _ in range(6):
        guard.add("B", None)
    for _ in range(3):
        guard.add("!!!!", "repeated punctuation")
    assert not guard.tripped  # 9 answers: too few to judge
    guard.add("!!!!", "repeated punctuation")
    assert guard.tripped and "bfloat16" in guard.message() and "qwen_1_5" in guard.message()


def test_degenerate_answers_stop_the_run_or_warn(videomme_folder, tiny_longva, tmp_path, monkeypatch):
    from longva_cli.engine import answering, objectives

    def degenerate_run(*args, **kwargs):  # the engine's run, answering "!!!!!!!!" at once
        yield from ()
        return objectives.Generated("!!!!!!!!", [0] * 8, "length", prompt_tokens=0, reused_tokens=0, prefill_s=0.0, generate_s=0.0)

    monkeypatch.setattr(answering, "run", degenerate_run)
    with pytest.raises(LongVAError, match="degenerate.*float16"):
        evaluate_local(videomme_folder, model=tiny_longva, frames=2, output=tmp_path / "stop", degenerate_min_samples=3)
    stopped = json.loads((tmp_path / "stop" / "results.json").read_text())
    assert stopped["status"].startswith("stopped") and stopped["degenerate"]["answers"] == 3
    warnings = []
    results = evaluate_local(videomme_folder, model=tiny_longva, frames=2, output=tmp_path / "warn", degenerate_min_samples=3,
                             stop_on_degenerate=False, on_warning=warnings.append)
    assert len(warnings) == 1 and "!!!!" in warnings[0]
    assert results["status"] == "complete" and results["degenerate"]["tripped"]


# ---- bad input ----------------------------------------------------------------------------------------


def test_bad_inputs_fail_with_one_sentence(tmp_path, videomme_folder, longva_main):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"video": "a.mp4", "question": "q", "options": ["x", "y"], "answer": "A"}\n{not json\n')
    missing_field = tmp_path / "nofield.jsonl"
    missing_field.write_text('{"video": "a.mp4", "options": ["x", "y"], "answer": "A"}\n')
    bad_answer = tmp_path / "badanswer.jsonl"
    bad_answer.write_text('{"video": "a.mp4", "question": "q", "options": ["x", "y"], "answer": "Z"}\n')
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--data", str(tmp_path / "nowhere")], "does not exist"),
        (["--data", str(broken)], "line 2 is not valid JSON"),
        (["--data", str(missing_field)], "line 1 lacks 'question'"),
        (["--data", str(empty)], "no annotation file"),
        (["--data", str(bad_answer)], "answer 'Z' is not one of the option letters A, B"),
        (["--data", str(videomme_folder), "--frames", "0"], "--frames must be a whole number at least 1"),
    ]
    for args, message in cases:
        done = longva_main("eval", "local", *args, "--model", "/nonexistent-model")
        assert done.returncode == 1, (args, done.stderr)
        assert message in done.stderr and done.stderr.startswith("error:") and "Traceback" not in done.stderr


# ---- --memory-budget -----------------------------------------------------------------------------------

# On the wide checkpoint (tests/conftest.py) at 2 new tokens, 48 MiB holds 2 frames a video only
# with an fp8 KV cache (their fp32 cache would not fit), and 4 frames under no setting.
BUDGET = "48MiB"


def budgeted_eval(longva_main, videomme_folder, checkpoint, output: Path, frames: int, *flags: str):
    return longva_main("eval", "local", "--data", videomme_folder, "--model", checkpoint, "--device", "cpu", "--frames", frames,
                       "--max-new-tokens", "2", "--output", output, "--no-cache", "--json", *flags)


def test_a_video_too_long_for_the_memory_budget_is_refused_before_loading(videomme_folder, wide_checkpoint, tmp_path, monkeypatch, longva_main):
    monkeypatch.setattr("longva_cli.engine.loader.load", lambda *a, **k: pytest.fail("the model was loaded"))
    refused = budgeted_eval(longva_main, videomme_folder, wide_checkpoint, tmp_path / "run", 4, "--memory-budget", BUDGET)
    assert refused.returncode == 1 and refused.stdout == "" and "Traceback" not in refused.stderr
    sentence = " ".join(refused.stderr.split())
    assert sentence.startswith("error: 4 frames need about") and sentence.count(". ") == 0
    assert sentence.endswith("ask for fewer frames (at most 2 fit: --frames 2) or raise --memory-budget.")


def test_a_budget_that_needs_an_fp8_kv_cache_loads_with_one_and_scores_every_question(
    videomme_folder, wide_checkpoint, tmp_path, monkeypatch, longva_main
):
    from longva_cli.engine import loader

    loaded_with, real_load = [], loader.load
    monkeypatch.setattr(loader, "load", lambda *a, **k: loaded_with.append(k) or real_load(*a, **k))
    planned = budgeted_eval(longva_main, videomme_folder, wide_checkpoint, tmp_path / "run", 2, "--memory-budget", BUDGET)
    assert planned.returncode == 0, planned.stderr
    assert "Memory plan for 2 frames on cpu: fp32 weights, fp8 KV cache, visual tokens on the device: about" in " ".join(planned.stderr.split())
    assert [(k["kv_cache"], k["quantize"]) for k in loaded_with] == [("fp8", None)]
    assert json.loads(planned.stdout)["summary"]["overall"]["total"] == 5


# ---- lmms-eval wiring ------------------------------------------------------------------------------------


def test_package_metadata_exposes_the_lmms_eval_entry_point():
    (entry,) = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == LMMS_MODEL_ID]
    assert entry.value == "longva_cli.eval:lmms_manifest"
    assert callable(entry.load())
    module, name = LMMS_CLASS_PATH.rsplit(".", 1)
    spec = importlib.util.find_spec(module)
    assert spec is not None
    tree = ast.parse(Path(spec.origin).read_text())
    assert name in {node.name for node in tree.body if isinstance(node, ast.ClassDef)}


def test_eval_tasks_without_lmms_eval_says_how_to_install(longva_main):
    if importlib.util.find_spec("lmms_eval") is not None:
        pytest.skip("lmms-eval is installed")
    done = longva_main("eval", "--tasks", "videomme")
    assert done.returncode == 1 and "pip install" in done.stderr and "torchvision" in done.stderr
    assert "Traceback" not in done.stderr


def test_lmms_eval_registry_resolves_our_model():
    pytest.importorskip("lmms_eval")
    from lmms_eval.models import get_model

    from longva_cli.eval.lmms import LongVALmms

    assert get_model(LMMS_MODEL_ID) is LongVALmms


def make_request(context, second, video, kind):
    from lmms_eval.api.instance import Instance

    args = (context, second, lambda doc: [str(video)], 0, "toy", "test")
    return Instance(request_type=kind, arguments=args, idx=0, metadata={"task": "toy", "doc_id": 0, "repeats": 1})


def test_lmms_model_generates_and_scores_by_teacher_forcing(tiny_longva, video_file):
    pytest.importorskip("lmms_eval")
    import torch

    from longva_cli.eval.lmms import LongVALmms
    from longva_cli.model.prompt import question_prompt

    lm = LongVALmms(longva=tiny_longva, max_frames_num=3)
    lm.task_dict = {"toy": {"test": [{}]}}
    gen = make_request("What is shown?", {"max_new_tokens": 4, "temperature": 0, "do_sample": False, "until": ["\n\n"]}, video_file, "generate_until")
    (text,) = lm.generate_until([gen])
    reference = tiny_longva.ask(video_file, "What is shown?", frames=3, max_new_tokens=4, temperature=0)
    assert text == reference.answer.split("\n\n")[0].strip()

    (scored,) = lm.loglikelihood([make_request("What is shown?", " a red square", video_file, "loglikelihood")])
    # reference: one forward over context + continuation, log-probs read at continuation positions
    from longva_cli.engine import MediaSpec, build, drive, encode, prompt_parts

    visual = drive(encode(tiny_longva, MediaSpec(video_file, frames=3)))
    prompt = build(tiny_longva, prompt_parts(question_prompt("What is shown?"), [visual]))
    context = prompt.embed(0, len(prompt))
    ids = tiny_longva.tokenizer(" a red square", add_special_tokens=False).input_ids
    full = torch.cat([context, tiny_longva.model.embed_tokens(torch.tensor(ids))])
    with torch.inference_mode():
        logits = tiny_longva.model(inputs_embeds=full[None]).logits[0, len(context) - 1 : -1].float()
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids)[:, None]).sum()
    assert scored[0] == pytest.approx(float(expected), abs=1e-3)
    assert scored[1] == bool((logits.argmax(-1) == torch.tensor(ids)).all())


TOY_TASK = """task: toyvqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 3
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

TOY_UTILS = """def doc_to_visual(doc):
    return [doc["video"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"acc": float(results[0].strip() == doc["answer"])}
"""


def test_eval_tasks_runs_lmms_eval_in_process_and_records_versions(tiny_longva, video_file, tmp_path, monkeypatch):
    pytest.importorskip("lmms_eval")
    from longva_cli.eval.lmms import run_lmms_eval

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"video": str(video_file), "question": f"Q{i}?", "answer": "A"}) + "\n" for i in range(2)))
    tasks = tmp_path / "toyvqa"
    tasks.mkdir()
    (tasks / "toyvqa.yaml").write_text(TOY_TASK.format(data=data))
    (tasks / "utils.py").write_text(TOY_UTILS)
    record = run_lmms_eval(["toyvqa"], model="tiny", frames=2, output=tmp_path / "out", include_path=tasks, longva=tiny_longva)
    assert "acc,none" in record["results"]["toyvqa"]
    assert record["run"]["versions"]["lmms-eval"] and record["run"]["conv_template"] == "qwen_1_5"
    assert record["degenerate"]["answers"] == 2
    assert len((tmp_path / "out" / "samples_toyvqa.jsonl").read_text().splitlines()) == 2
    assert json.loads((tmp_path / "out" / "results.json").read_text())["run"]["frames"] == 2
