"""`longva recipes` and recipe files: bundled names, the `command:` key, the README's examples."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import longva_cli
from longva_cli import recipes
from longva_cli.errors import LongVAError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def longva(longva_main, monkeypatch, tmp_path):
    """`longva ARGS...` in this process, in an empty folder (the README test below runs the executable)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    return longva_main


def readme_block(heading: str) -> list[str]:
    """The command lines of the first ```bash block under a README heading."""
    text = (REPO / "README.md").read_text()
    section = text.split(f"\n{heading}\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_bundled_recipes_ship_inside_the_package_and_name_their_command():
    package = Path(longva_cli.__file__).parent
    found = recipes.bundled_recipes()
    assert {recipes.bundled_name(p) for p in found} >= {
        "extend-text/tiny-cpu", "extend-text/qwen2-7b-224k", "align/tiny-cpu", "align/stage1-projector",
        "align/stage2-full", "align/dpo", "niah/v-niah-longva-7b", "niah/text-qwen2-224k",
    }
    for path in found:
        assert path.is_relative_to(package)
        assert yaml.safe_load(path.read_text())["command"] == path.parent.name
        command, _ = recipes.validate(recipes.bundled_name(path))
        assert command == path.parent.name


def test_old_repository_paths_name_the_bundled_recipe(tmp_path):
    bundled = recipes.RECIPES_DIR / "extend-text" / "tiny-cpu.yaml"
    assert recipes.find_recipe("extend-text/tiny-cpu") == bundled
    assert recipes.find_recipe("recipes/extend-text/tiny-cpu.yaml") == bundled
    assert recipes.find_recipe(tmp_path / "recipes" / "extend-text" / "tiny-cpu.yaml") == bundled
    with pytest.raises(LongVAError, match="recipe extend-text/tiny-gpu not found"):
        recipes.find_recipe("extend-text/tiny-gpu")


def test_show_writes_the_command_key_before_the_settings(longva):
    done = longva("recipes", "show", "align/tiny-cpu")
    assert done.returncode == 0, done.stderr
    settings = [line for line in done.stdout.splitlines() if line.strip() and not line.startswith("#")]
    assert settings[0] == "command: align"
    assert done.stdout.startswith("# ")  # the header comment still comes first


@pytest.mark.integration
def test_readme_recipe_examples_run_as_written(tmp_path):
    """The README's `## Recipes` block, line by line, in an empty folder (show > file, then validate it)."""
    lines = readme_block("## Recipes")
    assert any("validate my-recipe.yaml" in line for line in lines)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "COLUMNS": "200"}
    for line in lines:
        done = subprocess.run(line, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{line}: {done.stderr}"
    assert "well-formed" in done.stderr
    assert yaml.safe_load(done.stdout)["train"]["max_steps"] == 10


def test_validate_takes_the_command_from_the_key_or_from_the_flag(tmp_path, longva):
    text = recipes.find_recipe("extend-text/tiny-cpu").read_text()
    keyless = tmp_path / "keyless.yaml"
    keyless.write_text(text.replace("command: extend-text\n", ""))
    with pytest.raises(LongVAError, match="does not say which command it is for.*--command"):
        recipes.validate(keyless)
    command, settings = recipes.validate(keyless, ["train.max_steps=3"], command="extend-text")
    assert command == "extend-text" and settings.train.max_steps == 3
    done = longva("recipes", "validate", str(keyless), "--command", "align")
    assert done.returncode == 1 and "unknown recipe key" in done.stderr and "Traceback" not in done.stderr
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("command: extend-txt\n")
    with pytest.raises(LongVAError, match="names command 'extend-txt'; it must be one of align, extend-text, niah"):
        recipes.validate(wrong)


def test_a_training_command_refuses_a_recipe_for_another_command(longva):
    done = longva("align", "--recipe", "extend-text/tiny-cpu")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error: recipe extend-text/tiny-cpu is for `longva extend-text`")
