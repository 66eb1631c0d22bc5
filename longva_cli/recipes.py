"""YAML recipes: load, apply dotted `key=value` overrides, validate against a dataclass schema.

A recipe is a YAML mapping whose first comment lines say what it is for and how to launch it,
and whose `command:` key names the command it configures (`longva recipes validate` reads it,
so a copied recipe validates wherever it lives). Each command that takes recipes declares its
settings as (nested) dataclasses; `load_recipe` turns the YAML plus the command-line overrides
into an instance of that schema, or raises a LongVAError naming the exact bad key and what it
accepts. The bundled recipes live in the clone's top-level `recipes/<command>/<name>.yaml`, ship
in the wheel as `longva_cli/recipe_files/`, and are named `<command>/<name>`.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from longva_cli.errors import LongVAError


def _bundled_recipes() -> Path:
    """Where the bundled recipes are: inside the installed wheel, or at the top of a clone."""
    package = Path(__file__).resolve().parent
    installed = package / "recipe_files"  # pyproject.toml maps recipes/ here when building the wheel
    return installed if installed.is_dir() else package.parent / "recipes"


RECIPES_DIR = _bundled_recipes()
COMMAND_KEY = "command"

# The schema of each command's recipes ("module:Class"); bundled ones live in RECIPES_DIR/<command>/.
SCHEMAS: dict[str, str] = {
    "extend-text": "longva_cli.train.extend_text:ExtendTextRecipe",
    "align": "longva_cli.train.align:AlignRecipe",
    "niah": "longva_cli.niah.settings:NiahRecipe",
}

Schema = TypeVar("Schema")


def find_recipe(name_or_path: str | Path) -> Path:
    """A path as given, or a bundled recipe named like `extend-text/tiny-cpu`.

    A path into a clone's `recipes/` folder (`recipes/extend-text/tiny-cpu.yaml`) names the
    bundled recipe of the same command and name from any directory, so commands copied from the
    README work outside the clone too.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    bundled = RECIPES_DIR / (str(name_or_path).removesuffix(".yaml") + ".yaml")
    if bundled.is_file():
        return bundled
    if path.parent.parent.name == "recipes":
        moved = RECIPES_DIR / path.parent.name / (path.stem + ".yaml")
        if moved.is_file():
            return moved
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


def build(schema: type[Schema], data: dict[str, Any], prefix: str = "", defaults: Schema | None = None) -> Schema:
    """An instance of the dataclass `schema` from `data`, checking every key and type.

    Keys `data` leaves out take their value from `defaults` when given (a command's own
    defaults for a shared section: the parent field's `default_factory`), else the schema's.
    A schema's `RENAMED` mapping (old key -> sentence) explains keys that were renamed.
    """
    if not isinstance(data, dict):
        raise LongVAError(f"recipe key {prefix.rstrip('.') or '(top)'} must be a section of settings.")
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = get_type_hints(schema)
    unknown = sorted(set(data) - set(fields))
    renamed = getattr(schema, "RENAMED", {})
    for name in unknown:
        if name in renamed:
            raise LongVAError(f"{renamed[name]}; rename the key in your recipe.")
    if unknown:
        raise LongVAError(
            f"unknown recipe key {prefix}{unknown[0]}; allowed here: {', '.join(sorted(fields))}."
        )
    values = {}
    for name, field in fields.items():
        key = prefix + name
        if name in data:
            section_defaults = None
            if dataclasses.is_dataclass(hints[name]) and field.default_factory is not dataclasses.MISSING:
                section_defaults = field.default_factory()
            values[name] = _coerce(data[name], hints[name], key, section_defaults)
        elif defaults is not None:
            values[name] = getattr(defaults, name)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                values[name] = build(hints[name], {}, key + ".")
            else:
                raise LongVAError(f"recipe is missing the required key {key}.")
    return schema(**values)


def _coerce(value: Any, hint: Any, key: str, defaults: Any = None) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value if value is not None else {}, key + ".", defaults)
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


_WORDS = {int: "a whole number", float: "a number", str: "a string", bool: "true or false", Path: "a path"}


def _describe(hint: Any) -> str:
    args = [a for a in get_args(hint) if a is not type(None)]
    names = [_WORDS.get(a, getattr(a, "__name__", str(a))) for a in args]
    return " or ".join(names) + (" or null" if type(None) in get_args(hint) else "")


def command_of(schema: type) -> str | None:
    """The command whose recipes `schema` describes (None for a schema not in SCHEMAS)."""
    name = f"{schema.__module__}:{schema.__qualname__}"
    return next((command for command, target in SCHEMAS.items() if target == name), None)


def schema_of(command: str) -> type:
    """The schema class of a command's recipes."""
    if command not in SCHEMAS:
        raise LongVAError(f"no command {command!r} takes recipes; commands with recipes: {', '.join(sorted(SCHEMAS))}.")
    module, _, name = SCHEMAS[command].partition(":")
    return getattr(importlib.import_module(module), name)


def pop_command(data: dict[str, Any], where: str | Path) -> str | None:
    """Remove the `command:` key of a recipe's mapping and return it (None when absent)."""
    command = data.pop(COMMAND_KEY, None)
    if command is not None and command not in SCHEMAS:
        raise LongVAError(
            f"recipe {where} names command {command!r}; it must be one of {', '.join(sorted(SCHEMAS))}."
        )
    return command


def load_recipe(schema: type[Schema], recipe: str | Path | None, overrides: list[str] = ()) -> Schema:
    """The settings of `schema` from a recipe file (optional) plus dotted overrides.

    The file's `command:` key, if any, must name the command `schema` belongs to.
    """
    data = {}
    if recipe is not None:
        data = read_recipe(find_recipe(recipe))
        named, expected = pop_command(data, recipe), command_of(schema)
        if named is not None and expected is not None and named != expected:
            raise LongVAError(
                f"recipe {recipe} is for `longva {named}` (its command: key), not `longva {expected}`; "
                f"run it with `longva {named}`, or pick a {expected} recipe (`longva recipes list`)."
            )
    return build(schema, apply_overrides(data, list(overrides)))


def validate(recipe: str | Path, overrides: list[str] = (), command: str | None = None) -> tuple[str, Any]:
    """(command, settings) of a recipe checked against its command's schema.

    The command is `command` when given, else the recipe's own `command:` key.
    """
    path = find_recipe(recipe)
    data = read_recipe(path)
    named = pop_command(data, recipe)
    command = command or named
    if command is None:
        raise LongVAError(
            f"recipe {recipe} does not say which command it is for; add a line `command: extend-text` "
            f"(or {', '.join(c for c in sorted(SCHEMAS) if c != 'extend-text')}) at its top, or pass --command."
        )
    return command, build(schema_of(command), apply_overrides(data, list(overrides)))


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
    """Every recipe shipped with the package, sorted by command then name."""
    return sorted(RECIPES_DIR.glob("*/*.yaml"))


def bundled_name(path: Path) -> str:
    """`<command>/<name>` of a bundled recipe file."""
    return f"{path.parent.name}/{path.stem}"
