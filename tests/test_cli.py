"""`longva ask` and `longva download` end to end through a subprocess, and their bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import pytest

from support import REPO
from support.cli import assert_clean_error, longva, readme_block, run_lines
from support.media import write_video



@pytest.mark.integration
def test_version_and_help():
    result = longva("--version")
    assert result.returncode == 0 and result.stdout.startswith("longva ")
    for command in ("ask", "download", "recipes"):
        assert longva(command, "--help").returncode == 0


@pytest.mark.integration
def test_help_pages_show_defaults_and_brackets_as_written():
    niah = longva("niah", "video", "--help", env={"COLUMNS": "200"}).stdout
    assert "Smallest haystack, in frames [default: 200]." in niah
    assert "Run folder [default: runs/niah-video]" in niah
    ask = longva("ask", "--help", env={"COLUMNS": "200"}).stdout
    assert "[default: lmms-lab/LongVA-7B-DPO]" in ask and "[default: 32]" in ask
    assert "<bool>" not in ask + niah  # flags take no value
    json_line = next(line for line in ask.splitlines() if "--json" in line and "Print" in line)
    assert "--json" in json_line and "<" not in json_line.split("--json", 1)[1].split("Print")[0]


def test_a_run_without_plotting_names_the_extra_and_only_the_files_it_wrote(tmp_path, capsys):
    from longva_cli.niah.cli import report
    from longva_cli.niah.grid import GridRun
    from longva_cli.niah.heatmap import INSTALL_HINT

    (tmp_path / "all_accuracies.json").write_text("[]")
    (tmp_path / "avg_accuracy.txt").write_text("Average Accuracy: 1.0\n")
    cells = [{"num_frames": 2, "depth": 0.0, "score": 1.0}]
    report(GridRun(tmp_path, "video", cells, 1.0, 1, 0, INSTALL_HINT))
    err = capsys.readouterr().err
    assert "pip install 'longva[niah]'" in err
    assert "heatmap.png" not in err.split("results:", 1)[1]


@pytest.mark.integration
def test_ask_streams_an_answer_about_the_demo_video(tiny_checkpoint):
    result = longva("ask", str(REPO / "assets" / "demo.mp4"), "What is moving?", "--model", str(tiny_checkpoint),
                    "--max-new-tokens", "5", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n") and "Traceback" not in result.stderr
    assert "32 frames" in result.stderr and "4,608 visual" in result.stderr


@pytest.mark.integration
def test_ask_json_reads_the_question_from_stdin(tiny_checkpoint, video_file):
    result = longva("ask", str(video_file), "-", "--json", "--model", str(tiny_checkpoint), "--frames", "5",
                    "--max-new-tokens", "4", stdin="What colour is the car?\n")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)  # stdout holds the JSON object and nothing else
    assert record["frames"] == 5 and record["visual_tokens"] == 720 and record["media_type"] == "video"
    assert record["prompt_tokens"] > 720 and record["model"] == str(tiny_checkpoint)
    assert {"encode_s", "prefill_s", "generate_s"} <= set(record["timings"])


@pytest.mark.integration
def test_ask_an_image_by_content_not_extension(tiny_checkpoint, image_file, tmp_path):
    disguised = tmp_path / "picture.mp4"
    disguised.write_bytes(image_file.read_bytes())
    result = longva("ask", str(disguised), "Describe the image.", "--json", "--model", str(tiny_checkpoint), "--max-new-tokens", "3")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["media_type"] == "image" and record["visual_tokens"] == record["frames"] * 144


@pytest.mark.integration
def test_ask_samples_by_fps(tiny_checkpoint, video_file):
    result = longva("ask", str(video_file), "Q?", "--json", "--fps", "2", "--model", str(tiny_checkpoint), "--max-new-tokens", "1")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["frame_ids"] == [0, 5, 10, 15, 20, 25]  # 10 fps video, every 5th frame


@pytest.fixture(scope="module")
def bad_media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    truncated = folder / "truncated.mp4"
    good = write_video(folder / "good.mp4", frames=30)
    truncated.write_bytes(good.read_bytes()[:600])
    (folder / "not-an-image.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10)
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "notes.txt").write_text("hello")
    (folder / "latin-1.txt").write_bytes("Caf\u00e9 ou th\u00e9 ?\n".encode("latin-1"))
    (folder / "long-line.txt").write_text("Short?\n" + "x" * 1_000_001 + "\n")
    zero = av.open(str(folder / "zero-frames.mkv"), mode="w")  # a video stream with no frames in it
    stream = zero.add_stream("mpeg4", rate=10)
    stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
    zero.start_encoding()  # writes the header; no frame follows
    zero.close()
    return folder


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["missing.mp4", "Q?"], "does not exist"),
        (["{bad}/truncated.mp4", "Q?"], "truncated.mp4"),
        (["{bad}/not-an-image.jpg", "Q?"], "not-an-image.jpg"),
        (["{bad}/empty.mp4", "Q?"], "empty"),
        (["{bad}/notes.txt", "Q?"], "neither an image nor a video"),
        (["{bad}/zero-frames.mkv", "Q?"], "no frames"),
        (["{video}", "Q?", "--frames", "0"], "--frames must be a whole number at least 1, got 0."),
        (["{video}", "Q?", "--frames", "-3"], "--frames must be a whole number at least 1, got -3."),
        (["{video}", "Q?", "--fps", "0"], "--fps must be a finite number above 0, got 0.0."),
        (["{video}", "Q?", "--fps", "nan"], "--fps must be a finite number above 0, got nan."),
        (["{video}", "Q?", "--seed", "99999999999999999999"], "--seed must be a whole number at least -9223372036854775808 and at most 9223372036854775807, got 99999999999999999999."),
        (["{video}", "Q?", "--top-k", "-5", "--temperature", "1"], "--top-k must be a whole number at least 1, got -5."),
        (["{video}", "Q?", "--top-p", "1.5"], "--top-p must be a finite number above 0 and at most 1, got 1.5."),
        (["{video}", "Q?", "--temperature", "inf"], "--temperature must be a finite number at least 0, got inf."),
        (["{video}", "Q?", "--max-new-tokens", "0"], "--max-new-tokens must be a whole number at least 1, got 0."),
        (["{video}", "Q?", "--prefill-chunk", "-1"], "--prefill-chunk must be a whole number at least 1, got -1."),
        (["{video}", "Q?", "--model", "{ckpt}", "--frames", "1000000000"], "ask for fewer frames"),
        (["{video}", "Q?", "--temperature", "-1"], "--temperature"),
        (["{video}", "{huge}"], "question 1 has more than the 1,000,000 characters a question may have"),
        (["{video}", "--questions", "{bad}/latin-1.txt"], "--questions {bad}/latin-1.txt is not UTF-8 text (byte 3 is 0xe9)"),
        (["{video}", "--questions", "{bad}/long-line.txt"], "line 2 of --questions has more than the 1,000,000 characters"),
        (["{video}", "", ], "question is empty"),
        (["{video}", "Q?", "--model", "no-such-model"], "unknown model"),
        (["{video}", "Q?", "--model", "{bad}"], "not a complete LongVA checkpoint"),
        (["{video}", "Q?", "--model", "lmms-lab/LongVA-7B-DPO"], "LongVA-7B-DPO"),
        (["{video}", "Q?", "--model", "{ckpt}", "--device", "cuda"], "CUDA"),
        (["{video}", "Q?", "--model", "{ckpt}", "--dtype", "int3"], "--dtype"),
        (["{video}", "Q?", "--model", "{ckpt}", "--quantize", "4bit"], "CUDA"),
        (["{video}", "Q?", "--model", "{ckpt}", "--attn", "fastest"], "--attn 'fastest' is not known"),
        (["{video}", "Q?", "--model", "{ckpt}", "--attn", "cudnn/gemm", "--device", "cpu"], "runs on cuda, not cpu"),
    ],
)
def test_bad_input_gets_one_sentence_and_no_traceback(args, fragment, bad_media, video_file, tiny_checkpoint, monkeypatch, capsys):
    # In this process, through the executable's own `main` (a process each would cost seconds of
    # imports); the tests around this one run the real executable.
    from longva_cli.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    names = dict(bad=bad_media, video=video_file, ckpt=tiny_checkpoint, huge="x" * 10_000_001)  # a 10 MB question
    monkeypatch.setattr(sys, "argv", ["longva", "ask", *[a.format(**names) for a in args]])
    with pytest.raises(SystemExit) as exited:
        main()
    said = capsys.readouterr().err
    assert_clean_error(subprocess.CompletedProcess(sys.argv, exited.value.code, "", said), "")
    assert fragment.format(**names) in " ".join(said.split()), said  # rich may wrap a long path


@pytest.mark.integration
def test_truncated_video_is_reported_not_crashed(bad_media, tiny_checkpoint):
    result = longva("ask", str(bad_media / "truncated.mp4"), "Q?", "--model", str(tiny_checkpoint))
    assert_clean_error(result, "truncated.mp4")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.integration
def test_download_lists_short_names():
    result = longva("download", "--list")
    assert result.returncode == 0
    for name in ("LongVA-7B", "LongVA-7B-DPO", "Qwen2-7B-Instruct-224K", "clip-vit-large-patch14-336", "v_niah_needles"):
        assert name in result.stdout
    assert "lmms-lab/Qwen2-7B-Instrcuct-224K" in result.stdout  # the hub's own spelling


@pytest.mark.integration
def test_download_without_network_says_so(tmp_path):
    result = longva("download", "LongVA-7B", "--local-dir", str(tmp_path / "w"))
    assert_clean_error(result, "hub")


@pytest.mark.integration
def test_download_unknown_name():
    assert_clean_error(longva("download", "not a repo"), "unknown model")


@pytest.mark.integration
def test_download_checks_folders_without_importing_torch(tiny_checkpoint):
    """Resolving names and checking a downloaded folder read files only: `longva download`
    starts in a fraction of a second instead of the seconds torch and transformers take."""
    code = (
        "import sys\nfrom longva_cli.download import download\nfrom longva_cli.errors import LongVAError\n"
        "from longva_cli.model.files import missing_files\n"
        f"assert missing_files({str(tiny_checkpoint)!r}) == []\n"
        "try:\n    download('not a repo')\nexcept LongVAError:\n    pass\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch or transformers was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.integration
def test_recipes_list_names_every_bundled_recipe_with_its_first_sentence():
    result = longva("recipes", "list", env={"COLUMNS": "200"})
    assert result.returncode == 0 and result.stderr == ""  # a listing is the result: stdout, so `| grep tiny` finds it
    for name in ("extend-text/qwen2-7b-224k", "align/stage2-full", "niah/v-niah-longva-7b"):
        assert name in result.stdout
    assert "LongVA stage 1: extend Qwen2-7B-Instruct's text context to 224K tokens (rope_theta 1e9, 1000 steps)." in result.stdout


def test_temperatures_and_top_p_too_small_to_sample_at_decode_greedily(video_file, tiny_checkpoint, monkeypatch, capsys):
    # 1e-300 divided into the logits overflows them to inf, and sampling from the NaN softmax
    # ended `ask` in a RuntimeError; these now answer as --temperature 0 does.
    from longva_cli.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    answers = []
    for sampling in (["--temperature", "0"], ["--temperature", "1e-300"], ["--temperature", "1", "--top-p", "1e-300"]):
        monkeypatch.setattr(sys, "argv", ["longva", "ask", str(video_file), "What happens?", "--model", str(tiny_checkpoint),
                                          "--frames", "2", "--max-new-tokens", "6", "--seed", "1", *sampling])
        try:
            main()
        except SystemExit as exited:
            assert exited.code in (0, None), capsys.readouterr().err
        answers.append(capsys.readouterr().out)
    assert answers[0].strip() and answers == [answers[0]] * 3


# ---- what a new user meets: extras, Ctrl-C, spellings, help, the tiny kit -----------------------


@pytest.mark.parametrize("command, recipe", [("extend-text", "extend-text/tiny-cpu"), ("align", "align/tiny-cpu")])
def test_training_without_the_train_extra_names_it_in_one_line(command, recipe, longva_main, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # what `pip install -e .` without [train] leaves
    done = longva_main(command, "--recipe", recipe, "--output", tmp_path / "run")
    assert done.returncode == 1
    assert done.stderr == f"error: `longva {command}` needs deepspeed, which is not installed: pip install 'longva[train]'.\n"
    assert not (tmp_path / "run").exists()


def test_ctrl_c_in_any_command_is_one_line_and_status_130(longva_main, monkeypatch):
    from longva_cli import download

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(download, "download", interrupted)
    done = longva_main("download", "LongVA-7B")
    assert (done.returncode, done.stderr, done.stdout) == (130, "interrupted: stopped by Ctrl-C.\n", "")


def test_ctrl_c_in_training_names_the_kept_checkpoint_and_the_command_that_continues(longva_main, monkeypatch, tmp_path):
    from longva_cli.train import extend_text

    def stopped_after_a_checkpoint(recipe, resume=None, overwrite=False):
        (recipe.train.output_dir / "step_2").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(extend_text, "extend_text", stopped_after_a_checkpoint)
    run = tmp_path / "run"
    done = longva_main("extend-text", "--recipe", "extend-text/tiny-cpu", "train.save_every=2", "--output", run, "--overwrite")
    assert done.returncode == 130
    assert done.stderr == (
        f"interrupted: {run}/step_2 is kept (a checkpoint every 2 steps); continue with: "
        f"longva extend-text --recipe extend-text/tiny-cpu train.save_every=2 --output {run} --resume {run}\n"
    )

    def stopped_before_one(recipe, resume=None, overwrite=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(extend_text, "extend_text", stopped_before_one)
    done = longva_main("extend-text", "--recipe", "extend-text/tiny-cpu", "--output", tmp_path / "new")
    assert done.stderr.startswith("interrupted: no checkpoint was written yet (the first at step 15); start over with: longva extend-text")


def test_last_releases_spellings_still_work_with_a_note(capsys):
    from longva_cli.cli import old_spellings

    assert old_spellings(["eval", "ppl", "--tokens-step", "8", "--data", "d"]) == ["eval", "ppl", "--token-step", "8", "--data", "d"]
    assert old_spellings(["eval", "ppl", "--tokens-step=8"]) == ["eval", "ppl", "--token-step=8"]
    assert "--tokens-step is now --token-step" in capsys.readouterr().err
    # niah's --resume was a switch meaning the --output folder; it now takes the folder ("" = --output)
    assert old_spellings(["niah", "video", "--output", "runs/a", "--resume"]) == ["niah", "video", "--output", "runs/a", "--resume", ""]
    assert old_spellings(["niah", "text", "--resume", "--output", "runs/a"]) == ["niah", "text", "--resume", "", "--output", "runs/a"]
    assert "--resume now takes the run folder" in capsys.readouterr().err
    unchanged = ["niah", "video", "--resume", "runs/a"]
    assert old_spellings(unchanged) == unchanged and capsys.readouterr().err == ""


def test_help_shows_defaults_overrides_and_group_examples(longva_main):
    niah = longva_main("niah", "video", "--help").stdout
    for shown in ("[default: auto]", "[default: 4096]", "[default: teacher-forced]", "[default: v_niah_needles]"):
        assert shown in niah
    for command in ("extend-text", "align"):
        assert f"Usage: longva {command} [OPTIONS] [KEY=VALUE]..." in longva_main(command, "--help").stdout
    for group, example in (("niah", "longva niah video --resume runs/niah-longva"), ("recipes", "longva recipes list")):
        lines = [line.rstrip() for line in longva_main(group, "--help").stdout.splitlines()]
        assert f"   {example}" in lines  # indented under `examples:` (Rich's margin is one space)


def test_download_tiny_writes_a_kit_that_loads_and_prints_the_folder(longva_main, tmp_path):
    from longva_cli.download import tiny_commands
    from longva_cli.model.files import missing_files

    done = longva_main("download", "tiny", "--output", tmp_path / "kit")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{tmp_path / 'kit'}\n"  # the result: `folder=$(longva download tiny)` works
    for command in tiny_commands(str(tmp_path / "kit")):
        assert command in done.stderr
    assert missing_files(tmp_path / "kit" / "longva") == []
    assert (tmp_path / "kit" / "qwen2" / "config.json").is_file() and (tmp_path / "kit" / "needles" / "needles.jsonl").is_file()
    asked = longva_main("ask", tmp_path / "kit" / "clip.mp4", "What is moving?", "--model", tmp_path / "kit" / "longva", "--max-new-tokens", "4", "--json")
    assert asked.returncode == 0 and json.loads(asked.stdout)["answer"] is not None
    assert "tiny" in longva_main("download", "--list").stdout


@pytest.mark.integration
@pytest.mark.slow
def test_readme_try_it_without_a_gpu_runs_as_written(tmp_path):
    """The README's "Try it without a GPU" block, line by line, in an empty folder: it matches
    what `download tiny` prints, and each line exits 0."""
    from longva_cli.download import tiny_commands

    lines = readme_block("## Try it without a GPU")
    assert lines == ["longva download tiny", *tiny_commands("longva-tiny")]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "COLUMNS": "200"}
    download, *tries = lines  # each try needs only what the download wrote
    for line, done in zip(lines, run_lines([download], tmp_path, env) + run_lines(tries, tmp_path, env)):
        assert done.returncode == 0, f"{line}: {done.stderr[-2000:]}"
    assert (tmp_path / "runs" / "extend-tiny" / "step_4").is_dir() and (tmp_path / "runs" / "niah-tiny" / "heatmap.png").is_file()


def test_readme_set_up_says_how_to_install_on_a_cpu_only_machine():
    set_up = (REPO / "README.md").read_text().split("\n## Set up\n", 1)[1].split("\n## ", 1)[0]
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in set_up


@pytest.mark.integration
def test_help_and_tables_are_not_cut_at_80_columns_without_a_terminal():
    env = {key: value for key, value in os.environ.items() if key != "COLUMNS"}
    done = subprocess.run([sys.executable, "-m", "longva_cli", "extend-text", "--help"], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120, env=env)
    # a docstring paragraph is one line, wrapped by Rich at the (wide) width, not at the source's breaks
    assert "Trailing key=value arguments override recipe settings (dotted keys, YAML values). Multi-GPU" in done.stdout
    listed = subprocess.run([sys.executable, "-m", "longva_cli", "recipes", "list"], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=120, env=env)
    assert "LongVA stage 1: extend Qwen2-7B-Instruct's text context to 224K tokens (rope_theta 1e9, 1000 steps)." in listed.stdout


def test_status_lines_on_stderr_are_never_rewrapped(capsys):
    from longva_cli.console import stderr

    line = "video: 32 frames, 4,608 visual + 36 text tokens; " + "encode 5.2s, prefill 1.7s, 16 tokens in 1.4s; " * 4
    stderr.print(line)
    assert capsys.readouterr().err == line + "\n"


def test_niah_json_puts_the_scores_on_stdout_as_one_object(tmp_path, capsys):
    from longva_cli.niah.cli import report
    from longva_cli.niah.grid import GridRun

    (tmp_path / "avg_accuracy.txt").write_text("Average Accuracy: 0.5\n")
    cells = [{"num_frames": 2, "depth": 0.0, "score": 1.0}, {"num_frames": 2, "depth": 1.0, "score": 0.0}]
    report(GridRun(tmp_path, "video", cells, 0.5, 2, 0, None), json_output=True)
    out, err = capsys.readouterr()
    assert json.loads(out) == {"mode": "video", "average_accuracy": 0.5, "cells": cells, "folder": str(tmp_path), "files": ["avg_accuracy.txt"]}
    assert "results:" in err
