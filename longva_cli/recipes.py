"""YAML recipes: load, apply dotted `key=value` overrides, validate against a dataclass schema.

A recipe is a YAML mapping whose first comment lines say what it is for and how to launch it.
Each command that takes recipes declares its settings as (nested) dataclasses; `load_recipe`
turns the YAML plus the command-line overrides into an instance of that schema, or raises a
LongVAError naming the exact bad key and what it accepts.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from longva_cli.errors import LongVAError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"

# recipes/<folder>/*.yaml is validated against the schema named here ("module:Class").
SCHEMAS: dict[str, str] = {
    "extend-text": "longva_cli.train.extend_text:ExtendTextRecipe",
    "align": "longva_cli.train.align:AlignRecipe",
    "niah": "longva_cli.niah.settings:NiahRecipe",
}

Schema = TypeVar("Schema")


def find_recipe(name_or_path: str | Path) -> Path:
    """A path as given, or a bundled recipe named like `extend-text/tiny-cpu`."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = RECIPES_DIR / (str(name_or_path).removesuffix(".yaml") + ".yaml")
    if bundled.is_file():
        return bundled
    raise LongVAError(f"recipe {name_or_path} not found; `longva recipes list` shows the bundled ones.")


def read_recipe(path: Path) -> dict[str, Any]:
    """The YAML mapping of a recipe file."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise LongVAError(f"recipe {path} is not valid YAML{where}; fix the syntax there.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LongVAError(f"recipe {path} must be a YAML mapping of settings, not a {type(data).__name__}.")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set `a.b.c=value` entries (value parsed as YAML, so 5e8, true and [1, 2] work)."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise LongVAError(f"override {override!r} must look like key=value, e.g. train.max_steps=10.")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise LongVAError(f"override {key}: {part} is a value, not a section.")
            node = child
        node[leaf] = yaml.safe_load(raw) if raw.strip() else None
    return data


def build(schema: type[Schema], data: dict[str, Any], prefix: str = "") -> Schema:
    """An instance of the dataclass `schema` from `data`, checking every key and type."""
    if not isinstance(data, dict):
        raise LongVAError(f"recipe key {prefix.rstrip('.') or '(top)'} must be a section of settings.")
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = get_type_hints(schema)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise LongVAError(
            f"unknown recipe key {prefix}{unknown[0]}; allowed here: {', '.join(sorted(fields))}."
        )
    values = {}
    for name, field in fields.items():
        key = prefix + name
        if name in data:
            values[name] = _coerce(data[name], hints[name], key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                values[name] = build(hints[name], {}, key + ".")
            else:
                raise LongVAError(f"recipe is missing the required key {key}.")
    return schema(**values)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value if value is not None else {}, key + ".")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            try:
                return _coerce(value, option, key)
            except LongVAError:
                continue
        raise LongVAError(f"recipe key {key} must be {_describe(hint)}, got {value!r}.")
    if origin is Literal:
        if value not in args:
            raise LongVAError(f"recipe key {key} must be one of {', '.join(map(str, args))}, got {value!r}.")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise LongVAError(f"recipe key {key} must be a list, got {value!r}.")
        item = args[0] if args else Any
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise LongVAError(f"recipe key {key} must be a mapping, got {value!r}.")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise LongVAError(f"recipe key {key} must be true or false, got {value!r}.")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise LongVAError(f"recipe key {key} must be a whole number, got {value!r}.")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:  # PyYAML reads 1e-5 (no dot) as a string
                return float(value)
            except (TypeError, ValueError):
                raise LongVAError(f"recipe key {key} must be a number, got {value!r}.") from None
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise LongVAError(f"recipe key {key} must be a string, got {value!r}.")
        return str(value)
    if hint is Path:
        if not isinstance(value, str):
            raise LongVAError(f"recipe key {key} must be a path, got {value!r}.")
        return Path(value).expanduser()
    raise TypeError(f"recipe schema type {hint!r} at {key} is not supported")


def _describe(hint: Any) -> str:
    args = [a for a in get_args(hint) if a is not type(None)]
    names = [getattr(a, "__name__", str(a)) for a in args]
    return " or ".join(names) + (" or null" if type(None) in get_args(hint) else "")


def load_recipe(schema: type[Schema], recipe: str | Path | None, overrides: list[str] = ()) -> Schema:
    """The settings of `schema` from a recipe file (optional) plus dotted overrides."""
    data = read_recipe(find_recipe(recipe)) if recipe is not None else {}
    return build(schema, apply_overrides(data, list(overrides)))


def to_dict(settings: Any) -> dict[str, Any]:
    """A plain, YAML-safe dictionary of a recipe instance (paths as strings)."""

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(settings))


def header(path: Path) -> str:
    """The leading comment block of a recipe file, without the `#` marks."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return "\n".join(lines).strip()


def summary(path: Path) -> str:
    """The first sentence of a recipe's header comment."""
    text = " ".join(header(path).split())
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


def bundled_recipes() -> list[Path]:
    """Every recipe shipped in `recipes/`, sorted by command then name."""
    return sorted(RECIPES_DIR.glob("*/*.yaml")) if RECIPES_DIR.is_dir() else []



def schema_for(path: Path) -> type:
    """The schema class of a recipe, from the folder it lives in (recipes/<command>/...)."""
    folder = path.resolve().parent.name
    if folder not in SCHEMAS:
        known = ", ".join(sorted(SCHEMAS)) or "none"
        raise LongVAError(f"recipe {path} is not in a known recipe folder; recipe folders: {known}.")
    module, _, name = SCHEMAS[folder].partition(":")
    return getattr(importlib.import_module(module), name)
