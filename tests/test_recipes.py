"""`longva recipes` and recipe files: bundled names, the `command:` key, the README's examples."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import longva_cli
from longva_cli import recipes
from longva_cli.errors import LongVAError
from support import REPO
from support.cli import readme_block



@pytest.fixture
def longva(longva_main, monkeypatch, tmp_path):
    """`longva ARGS...` in this process, in an empty folder (the README test below runs the executable)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    return longva_main


def test_bundled_recipes_sit_at_the_top_of_the_clone_and_name_their_command():
    top = Path(longva_cli.__file__).parent.parent / "recipes"
    found = recipes.bundled_recipes()
    assert {recipes.bundled_name(p) for p in found} >= {
        "extend-text/tiny-cpu", "extend-text/qwen2-7b-224k", "align/tiny-cpu", "align/stage1-projector",
        "align/stage2-full", "align/dpo", "niah/v-niah-longva-7b", "niah/text-qwen2-224k",
    }
    for path in found:
        assert path.is_relative_to(top)
        assert yaml.safe_load(path.read_text())["command"] == path.parent.name
        command, _ = recipes.validate(recipes.bundled_name(path))
        assert command == path.parent.name


def test_clone_paths_name_the_bundled_recipe_from_anywhere(tmp_path, monkeypatch):
    bundled = recipes.RECIPES_DIR / "extend-text" / "tiny-cpu.yaml"
    assert recipes.find_recipe("extend-text/tiny-cpu") == bundled
    monkeypatch.chdir(REPO)
    assert recipes.find_recipe("recipes/extend-text/tiny-cpu.yaml").resolve() == bundled
    monkeypatch.chdir(tmp_path)
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


def one_error_line(done: subprocess.CompletedProcess) -> str:
    """The single `error:` line of a refused command (and nothing else on stderr)."""
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error: ")
    return line


@pytest.mark.parametrize("override, fragment", [
    ("optimizer.lr=-1", "optimizer.lr must be a finite number above 0, got -1.0"),
    ("optimizer.lr=.nan", "optimizer.lr must be a finite number"),
    ("optimizer.betas=[1.5,0.9]", "optimizer.betas[0] must be a finite number at least 0 and below 1, got 1.5"),
    ("train.max_steps=0", "train.max_steps must be a whole number at least 1"),
    ("train.seed=99999999999999999999", "train.seed must fit in 64 bits"),
    ("train.seed=-1", "train.seed must be a whole number at least 0"),
    ("data.seq_len=1.5", "data.seq_len must be a whole number"),
    ("parallel.zero_stage=true", "parallel.zero_stage must be one of 0, 1, 2, 3, got True"),
    ("train.max_steps=[unclosed", "override train.max_steps is not valid YAML at line 1, column 10"),
    ("data.source=/no/such/book.txt", "/no/such/book.txt"),
])
def test_validate_and_the_command_refuse_exactly_the_same_overrides(override, fragment, longva_main, tmp_path):
    """`recipes validate` runs the command's own checks: the same sentence, and the command
    stops on it before it writes anything."""
    validated = one_error_line(longva_main("recipes", "validate", "extend-text/tiny-cpu", override))
    trained = one_error_line(longva_main("extend-text", "--recipe", "extend-text/tiny-cpu", override, "--output", tmp_path / "run"))
    assert fragment in validated and validated == trained
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command, recipe, bad", [
    ("align", "align/tiny-cpu", {"model": {"image_grid_pinpoints": "(1x1),...,(99999x99999)"}}),
    ("align", "align/tiny-cpu", {"data": {"num_workers": -1}}),
    ("niah", "niah/v-niah-longva-7b", {"video": {"depth_step": 0.3}}),
    ("niah", "niah/v-niah-longva-7b", {"video": {"frame_step": 0}}),
    ("niah", "niah/text-qwen2-224k", {"text": {"distractors": 7}}),
])
def test_every_command_with_recipes_is_checked_by_validate_as_by_the_command(command, recipe, bad, longva_main, tmp_path):
    data = yaml.safe_load(recipes.find_recipe(recipe).read_text())
    for section, values in bad.items():
        data[section].update(values)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    validated = one_error_line(longva_main("recipes", "validate", path))
    mode = data.get("mode", "video")
    run = ["niah", mode, "--recipe", path, "--haystack", path] if command == "niah" else [command, "--recipe", path]
    assert validated == one_error_line(longva_main(*run, "--output", tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def alias_bomb(levels: int = 9) -> str:
    """Billion laughs in YAML: each level a list of nine aliases of the one before (9**9 strings)."""
    lines = ['command: extend-text', 'l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        lines.append(f"l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * 9)}]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text, fragment", [
    (alias_bomb(), "expands to more than 100,000 values"),
    ("command: extend-text\nmodel:\n  config: " + "[" * 5000 + "]" * 5000 + "\n", "nests deeper than 32 levels"),
    ("command: extend-text\na: &a [*a]\n", "contains itself (a YAML alias inside its own anchor)"),
    ("command: extend-text\ntrain: {max_steps: 1" + "0" * 5000 + "}\n", "holds a value YAML cannot read (Exceeds the limit (4300 digits) for integer string conversion"),
])
def test_hostile_recipe_files_are_refused_in_one_sentence(text, fragment, longva_main, tmp_path):
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    assert fragment in one_error_line(longva_main("recipes", "validate", path))


def test_a_bomb_under_an_override_is_measured_with_the_recipe(longva_main):
    line = one_error_line(longva_main("recipes", "validate", "extend-text/tiny-cpu", "model.config=" + "[" * 200 + "]" * 200))
    assert "override model.config nests deeper than 32 levels" in line


@pytest.mark.parametrize("content, fragment", [
    ("command: extend-text\n# café\n".encode("latin-1"), "is not UTF-8 text (byte 26 is 0xe9); save it as UTF-8"),
    (bytes(range(256)) * 4, "is not UTF-8 text"),
    (b"command: extend-text\n" + b"#" * (2 << 20), "bytes"),
])
def test_recipes_that_are_not_text_are_named(content, fragment, longva_main, tmp_path):
    path = tmp_path / "odd.yaml"
    path.write_bytes(content)
    for args in (["recipes", "validate", path], ["recipes", "show", path], ["extend-text", "--recipe", path]):
        assert fragment in one_error_line(longva_main(*args))
