"""A non-editable install: build the wheel, install it into a fresh environment, use its recipes.

The fresh environment sees the dependencies already installed next to this Python (one `.pth`
line) but not the repository, so whatever `longva` reads there comes from the wheel.
Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from support import REPO
from support.cli import readme_block, run_lines
from support.media import write_image, write_video



def run(*command: str | Path, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command}: {done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel of this checkout installed; its bin folder."""
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"  # a copy, so the build leaves nothing in the checkout
    for folder in ("longva_cli", "recipes"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    run(sys.executable, "-m", "pip", "wheel", source, "--no-deps", "--no-build-isolation", "--no-index",
        "-w", root / "dist", cwd=root)
    [wheel] = (root / "dist").glob("longva-*.whl")
    run(sys.executable, "-m", "venv", "--without-pip", root / "env", cwd=root)
    env_python = root / "env" / "bin" / "python"
    target = Path(run(env_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=root).stdout.strip())
    # the dependencies (and pip) from this environment, without running its .pth files: the
    # editable install of the checkout stays invisible
    paths = dict.fromkeys([sysconfig.get_paths()["purelib"], *site.getsitepackages()])
    (target / "dependencies.pth").write_text("".join(f"{path}\n" for path in paths))
    # --ignore-installed: never touch the editable install that the .pth line makes visible
    run(env_python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", wheel, cwd=root)
    return root / "env" / "bin"


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}


@pytest.mark.integration
def test_the_wheel_carries_the_recipes_and_runs_one_from_anywhere(installed, tmp_path):
    env = clean_env()
    where = run(installed / "python", "-c", "import longva_cli; print(longva_cli.__file__)", cwd=tmp_path, env=env)
    assert Path(where.stdout.strip()).is_relative_to(installed.parent)  # the wheel's copy, not the checkout
    listed = run(installed / "longva", "recipes", "list", cwd=tmp_path, env=env)
    for name in ("extend-text/tiny-cpu", "align/tiny-cpu", "niah/v-niah-longva-7b"):
        assert name in listed.stdout
    shown = run(installed / "longva", "recipes", "show", "extend-text/tiny-cpu", cwd=tmp_path, env=env)
    (tmp_path / "my-recipe.yaml").write_text(shown.stdout)
    run(installed / "longva", "recipes", "validate", "my-recipe.yaml", "train.max_steps=2", cwd=tmp_path, env=env)
    trained = run(installed / "longva", "extend-text", "--recipe", "extend-text/tiny-cpu", "train.max_steps=1",
                  "data.seq_len=32", "--output", "run", cwd=tmp_path, env=env)
    assert "Done:" in trained.stderr and trained.stdout == "run/step_1\n"  # the result on stdout, nothing else
    assert (tmp_path / "run" / "latest").read_text().strip() == "step_1"


def fake_hub_cache(root: Path, repo: str) -> Path:
    """A Hugging Face hub cache in which `repo` is "downloaded": a tiny checkpoint in its layout."""
    from longva_cli.model.tiny import write_tiny_checkpoint

    folder = root / f"models--{repo.replace('/', '--')}"
    write_tiny_checkpoint(folder / "snapshots" / ("0" * 40))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    return root


@pytest.mark.integration
@pytest.mark.slow
def test_the_readme_ask_and_chat_examples_run_as_written_from_the_wheel(installed, tmp_path):
    """Every `ask` and `chat` example of the README, word for word, in a folder holding the files
    they name, with LongVA-7B-DPO in the hub cache as a tiny checkpoint of its exact layout."""
    write_video(tmp_path / "movie.mp4", frames=100, fps=10)
    write_video(tmp_path / "clip.mp4", frames=30, fps=10)
    write_image(tmp_path / "photo.jpg")
    (tmp_path / "questions.txt").write_text("Who drives?\nWhere are they going?\n")
    env = {**clean_env(), "PATH": f"{installed}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "HF_HUB_CACHE": str(fake_hub_cache(tmp_path / "hub", "lmms-lab/LongVA-7B-DPO")), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    lines = readme_block("## Ask about a video or an image") + readme_block("## Chat about a video or an image")
    assert len(lines) >= 8 and any("longva chat" in line for line in lines)
    if shutil.which("jq") is None:
        lines = [line.removesuffix("| jq .answer") for line in lines]
    download, *asks = lines  # the download puts the model in place; the questions need nothing of one another
    assert download.startswith("longva download")
    for line, done in zip(lines, run_lines([download], tmp_path, env, 300) + run_lines(asks, tmp_path, env, 300)):
        assert done.returncode == 0, f"{line}\n{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [a["question"] for a in answers] == ["Who drives?", "Where are they going?"]


def test_the_wheel_lists_every_package_of_the_source_tree():
    """pyproject.toml names the packages by hand (the recipes map in from the top-level folder), so
    a new subpackage left out of that list would silently be missing from the wheel."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(init.parent.relative_to(REPO).parts) for init in (REPO / "longva_cli").rglob("__init__.py")}
    assert listed == on_disk | {"longva_cli.recipe_files"}
