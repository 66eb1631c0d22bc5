"""Fuzzing the command line and recipe files: every impossible value of every numeric option and
recipe key gets one sentence naming it, a non-zero exit and no traceback, before any work.

The values are impossible for every option (not a number, not finite, past float's range, far
below zero, a lone surrogate), so each run must be refused; the other arguments are valid, so a
value that slipped through would start the command and fail the test.
"""

from __future__ import annotations

import json
import random
from typing import get_args

import pytest
import typer
import yaml

from longva_cli import recipes
from longva_cli.cli import app

IMPOSSIBLE = ["nan", "inf", "-inf", "1e400", "abc", "", "-99999999999999999999", "\udcff", "0x1p-1074x"]
IMPOSSIBLE_WHOLE = ["1.5", "1e3"]  # also not whole numbers


def numeric_options(*path: str) -> list[tuple[str, type]]:
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    found = []
    for param in command.params:
        annotation = param.type_descriptor.annotation
        kind = next((k for k in (int, float) if annotation is k or k in get_args(annotation)), None)
        if kind and param.opts and param.opts[0].startswith("--"):
            found.append((param.opts[0], kind))
    return found


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """Valid arguments for each command: the tiny kit `longva download tiny` writes."""
    from longva_cli.download import write_tiny_kit

    folder = write_tiny_kit(tmp_path_factory.mktemp("kit"))
    questions = folder / "questions.jsonl"
    questions.write_text(json.dumps({"video": "clip.mp4", "question": "What moves?", "options": ["A. a square", "B. a circle"],
                                     "answer": "A"}) + "\n")
    return folder


def base_arguments(kit, tmp_path) -> dict[tuple[str, ...], list[str]]:
    media, longva, qwen2 = str(kit / "clip.mp4"), str(kit / "longva"), str(kit / "qwen2")
    return {
        ("ask",): [media, "What moves?", "--model", longva, "--device", "cpu", "--max-new-tokens", "2"],
        ("niah", "video"): ["--haystack", media, "--needles", str(kit / "needles"), "--model", longva, "--device", "cpu",
                            "--min-frames", "4", "--max-frames", "4", "--output", str(tmp_path / "niah")],
        ("niah", "text"): ["--model", qwen2, "--haystack", str(kit / "book.txt"), "--min-tokens", "64", "--max-tokens", "64",
                           "--device", "cpu", "--output", str(tmp_path / "niah-text")],
        ("eval", "ppl"): ["--model", qwen2, "--data", str(kit / "book.txt"), "--min-tokens", "64", "--max-tokens", "64",
                          "--device", "cpu", "--output", str(tmp_path / "ppl")],
        ("eval", "local"): ["--data", str(kit / "questions.jsonl"), "--model", longva, "--device", "cpu", "--frames", "2",
                            "--output", str(tmp_path / "local")],
    }


def cases() -> list[tuple[tuple[str, ...], str, str]]:
    """Every (command, numeric option, impossible value)."""
    found = []
    for path in (("ask",), ("niah", "video"), ("niah", "text"), ("eval", "ppl"), ("eval", "local")):
        for option, kind in numeric_options(*path):
            for value in IMPOSSIBLE + (IMPOSSIBLE_WHOLE if kind is int else []):
                found.append((path, option, value))
    return found


def test_every_impossible_option_value_is_one_sentence_before_any_work(kit, tmp_path, longva_main):
    refused, failures = [], []
    for path, option, value in cases():
        args = [*path, *base_arguments(kit, tmp_path)[path]]
        if option in args:  # the base's own value of this option goes
            at = args.index(option)
            del args[at:at + 2]
        done = longva_main(*args, option, value)
        lines = done.stderr.strip().splitlines()
        one_sentence = done.returncode in (1, 2) and len(lines) == 1 and lines[0].startswith("error: ")  # 2: a usage error
        wrote = [name for name in ("niah", "niah-text", "ppl", "local") if (tmp_path / name).exists()]
        if not one_sentence or "Traceback" in done.stderr or wrote:
            failures.append(f"longva {' '.join(path)} {option} {value!r}: {done.returncode} {wrote} {done.stderr[-300:]}")
        else:
            refused.append(lines[0])
    assert failures == [] and len(refused) > 300


def recipe_keys(settings, prefix="") -> list[tuple[str, object]]:
    """(dotted key, value) of every leaf of a built recipe."""
    import dataclasses

    found = []
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if dataclasses.is_dataclass(value):
            found += recipe_keys(value, f"{prefix}{field.name}.")
        else:
            found.append((f"{prefix}{field.name}", value))
    return found


NUMERIC_YAML = [".nan", ".inf", "-.inf", "1e400", "-99999999999999999999", "[1, 2]", "{a: 1}", "'x'", "true", "[[[[[[[[]]]]]]]]"]


@pytest.mark.parametrize("recipe", ["extend-text/tiny-cpu", "align/tiny-cpu", "niah/v-niah-longva-7b", "niah/text-qwen2-224k"])
def test_random_bad_values_in_recipe_files_are_one_sentence(recipe, tmp_path):
    """A few hundred recipe files, each with one numeric key set to a random impossible value:
    `recipes validate` (the command's own checks) refuses each in one sentence naming the key."""
    from longva_cli.errors import LongVAError

    command, settings = recipes.validate(recipe)
    numeric = [(key, value) for key, value in recipe_keys(settings) if isinstance(value, (int, float)) and not isinstance(value, bool)]
    rng = random.Random(recipe)
    for trial in range(60):
        key, _ = rng.choice(numeric)
        bad = rng.choice(NUMERIC_YAML)
        data = yaml.safe_load(recipes.find_recipe(recipe).read_text())
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(bad)
        path = tmp_path / f"trial-{trial}.yaml"
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(LongVAError) as refused:
            recipes.validate(path)
        message = str(refused.value)
        assert "\n" not in message and (leaf in message or f"--{leaf.replace('_', '-')}" in message), (key, bad, message)
