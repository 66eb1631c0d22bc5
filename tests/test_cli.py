"""`longva ask` and `longva download` end to end through a subprocess, and their bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import pytest

from media import write_video

REPO = Path(__file__).resolve().parent.parent


def longva(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "longva_cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def assert_clean_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert fragment in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")


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
        (["{video}", "Q?", "--frames", "0"], "--frames must be at least 1"),
        (["{video}", "Q?", "--frames", "-3"], "--frames must be at least 1"),
        (["{video}", "Q?", "--fps", "0"], "--fps must be positive"),
        (["{video}", "Q?", "--fps", "nan"], "--fps must be positive"),
        (["{video}", "Q?", "--model", "{ckpt}", "--frames", "1000000000"], "ask for fewer frames"),
        (["{video}", "Q?", "--temperature", "-1"], "--temperature"),
        (["{video}", "", ], "question is empty"),
        (["{video}", "Q?", "--model", "no-such-model"], "unknown model"),
        (["{video}", "Q?", "--model", "{bad}"], "not a complete LongVA checkpoint"),
        (["{video}", "Q?", "--model", "lmms-lab/LongVA-7B-DPO"], "LongVA-7B-DPO"),
        (["{video}", "Q?", "--model", "{ckpt}", "--device", "cuda"], "CUDA"),
        (["{video}", "Q?", "--model", "{ckpt}", "--dtype", "int3"], "--dtype"),
        (["{video}", "Q?", "--model", "{ckpt}", "--quantize", "4bit"], "CUDA"),
    ],
)
def test_bad_input_gets_one_sentence_and_no_traceback(args, fragment, bad_media, video_file, tiny_checkpoint, monkeypatch, capsys):
    # In this process, through the executable's own `main` (a process each would cost seconds of
    # imports); the tests around this one run the real executable.
    from longva_cli.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", ["longva", "ask", *[a.format(bad=bad_media, video=video_file, ckpt=tiny_checkpoint) for a in args]])
    with pytest.raises(SystemExit) as exited:
        main()
    assert_clean_error(subprocess.CompletedProcess(sys.argv, exited.value.code, "", capsys.readouterr().err), fragment)


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
    assert result.returncode == 0
    for name in ("extend-text/qwen2-7b-224k", "align/stage2-full", "niah/v-niah-longva-7b"):
        assert name in result.stderr
    assert "LongVA stage 1: extend Qwen2-7B-Instruct's text context to 224K tokens (rope_theta 1e9, 1000 steps)." in result.stderr
