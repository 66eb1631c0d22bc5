"""YAML recipes: load, apply dotted `key=value` overrides, validate against a dataclass schema.

A recipe is a YAML mapping whose first comment lines say what it is for and how to launch it,
and whose `command:` key names the command it configures (`longva recipes validate` reads it,
so a copied recipe validates wherever it lives). Each command that takes recipes declares its
settings as (nested) dataclasses; `load_recipe` turns the YAML plus the command-line overrides
into an instance of that schema, or raises a LongVAError naming the exact bad key and what it
accepts. The bundled recipes live in the clone's top-level `recipes/<command>/<name>.yaml`, ship
in the wheel as `longva_cli/recipe_files/`, and are named `<command>/<name>`.

Every number goes through `checks.check_number` (finite, of the right type); each command's
module then exposes `check(settings)`, the value checks the command runs before any work and
`longva recipes validate` runs too, so the two refuse exactly the same recipes. A recipe is a
page of settings: files and override values are bounded in size, nesting and alias expansion
before anything walks them (`parse_yaml`, `check_shape`).
"""

from __future__ import annotations

import dataclasses
import importlib
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from longva_cli.checks import check_number, checked_text, read_text_file, shown_value
from longva_cli.errors import LongVAError


def _bundled_recipes() -> Path:
    """Where the bundled recipes are: inside the installed wheel, or at the top of a clone."""
    package = Path(__file__).resolve().parent
    installed = package / "recipe_files"  # pyproject.toml maps recipes/ here when building the wheel
    return installed if installed.is_dir() else package.parent / "recipes"


RECIPES_DIR = _bundled_recipes()
COMMAND_KEY = "command"

# The schema of each command's recipes ("module:Class"); the module's `check(settings)` holds the
# command's value checks. Bundled recipes live in RECIPES_DIR/<command>/.
SCHEMAS: dict[str, str] = {
    "extend-text": "longva_cli.train.extend_text:ExtendTextRecipe",
    "align": "longva_cli.train.align:AlignRecipe",
    "niah": "longva_cli.niah.settings:NiahRecipe",
}

Schema = TypeVar("Schema")

# Bounds far above any real recipe (a few KB, four levels, a few hundred values) and far below
# what hurts: a 1 KB alias bomb expands to billions of values, a list nested 5000 deep overflows
# the YAML composer's recursion.
MAX_RECIPE_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_VALUES = 100_000


class _TooDeep(Exception):
    pass


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader that stops at MAX_DEPTH levels while it composes (its composer
    recurses once per level)."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _TooDeep()
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def parse_yaml(text: str, where: str) -> Any:
    """The value of a YAML text (a recipe file, an override's value), bounded by `check_shape`;
    one sentence naming `where` for anything else."""
    try:
        data = yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except _TooDeep:
        raise LongVAError(f"{where} nests deeper than {MAX_DEPTH} levels; a recipe's settings are a few levels deep.") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise LongVAError(f"{where} is not valid YAML{at} ({problem}); fix the syntax there.") from None
    except ValueError as err:  # a constructor's: 2001-13-45 as a date, an integer of 5000 digits
        reason = str(err).split(";")[0]  # (Python's advice to call sys.set_int_max_str_digits is not the user's)
        raise LongVAError(f"{where} holds a value YAML cannot read ({reason}); quote it to make it text.") from None
    check_shape(data, where)
    return data


def check_shape(data: Any, where: str) -> None:
    """Refuse data nested deeper than MAX_DEPTH or with more than MAX_VALUES values once its
    aliases are expanded (each shared part counted where it is used), data that contains
    itself, and text that is not valid Unicode. Shared parts are measured once, so an alias
    bomb is refused in microseconds."""
    measured: dict[int, tuple[int, int]] = {}  # id -> (values, depth) of a finished container
    open_containers: set[int] = set()  # the containers being measured: the current path
    stack: list[tuple[Any, bool]] = [(data, False)]
    while stack:
        node, children_measured = stack.pop()
        if isinstance(node, str):
            checked_text(node, where)
        if not isinstance(node, (dict, list)):
            continue
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        if children_measured:
            open_containers.discard(id(node))
            values = 1 + sum(measured[id(c)][0] if isinstance(c, (dict, list)) else 1 for c in children)
            depth = 1 + max((measured[id(c)][1] for c in children if isinstance(c, (dict, list))), default=0)
            if depth > MAX_DEPTH:
                raise LongVAError(f"{where} nests deeper than {MAX_DEPTH} levels; a recipe's settings are a few levels deep.")
            if values > MAX_VALUES:
                raise LongVAError(
                    f"{where} expands to more than {MAX_VALUES:,} values (YAML aliases count where they are used); "
                    "write the settings out without aliases."
                )
            measured[id(node)] = (values, depth)
        elif id(node) not in measured:
            if id(node) in open_containers:
                raise LongVAError(f"{where} contains itself (a YAML alias inside its own anchor); write the settings out.")
            open_containers.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in children)


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
    data = parse_yaml(read_text_file(path, "recipe", max_bytes=MAX_RECIPE_BYTES), f"recipe {path}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LongVAError(f"recipe {path} must be a YAML mapping of settings, not a {type(data).__name__}.")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set `a.b.c=value` entries (value parsed as YAML, so 5e8, true and [1, 2] work)."""
    for override in overrides:
        checked_text(override, "an override")
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise LongVAError(f"override {shown_value(override)} must look like key=value, e.g. train.max_steps=10.")
        parts = key.split(".")
        if len(parts) > MAX_DEPTH:
            raise LongVAError(f"override {shown_value(key)} names {len(parts)} levels; recipe keys are a few levels deep.")
        node = data
        *parents, leaf = parts
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise LongVAError(f"override {key}: {part} is a value, not a section.")
            node = child
        node[leaf] = parse_yaml(raw, f"override {key}") if raw.strip() else None
    check_shape(data, "the recipe with its overrides")
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
    unknown = sorted((name for name in data if name not in fields), key=str)
    renamed = getattr(schema, "RENAMED", {})
    for name in unknown:
        if name in renamed:
            raise LongVAError(f"{renamed[name]}; rename the key in your recipe.")
    if unknown:
        raise LongVAError(
            f"unknown recipe key {prefix}{shown_value(unknown[0]) if not isinstance(unknown[0], str) else unknown[0]}; "
            f"allowed here: {', '.join(sorted(fields))}."
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
        if options in ([int], [float]):  # an optional number: the number's own sentence, "or null" added
            return _number(value, options[0], key, nullable=True)
        for option in options:
            try:
                return _coerce(value, option, key)
            except LongVAError:
                continue
        raise LongVAError(f"recipe key {key} must be {_describe(hint)}, got {shown_value(value)}.")
    if origin is Literal:
        # by type too: true == 1 and 1.0 == 1, but neither is ZeRO stage 1
        if not any(type(value) is type(arg) and value == arg for arg in args):
            raise LongVAError(f"recipe key {key} must be one of {', '.join(map(str, args))}, got {shown_value(value)}.")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise LongVAError(f"recipe key {key} must be a list, got {shown_value(value)}.")
        item = args[0] if args else Any
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise LongVAError(f"recipe key {key} must be a mapping, got {shown_value(value)}.")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise LongVAError(f"recipe key {key} must be true or false, got {shown_value(value)}.")
        return value
    if hint in (int, float):
        return _number(value, hint, key)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise LongVAError(f"recipe key {key} must be a string, got {shown_value(value)}.")
        return str(value)
    if hint is Path:
        if not isinstance(value, str) or not value or "\0" in value:
            raise LongVAError(f"recipe key {key} must be a path, got {shown_value(value)}.")
        return Path(value).expanduser()
    raise TypeError(f"recipe schema type {hint!r} at {key} is not supported")


def _number(value: Any, hint: type, key: str, nullable: bool = False) -> int | float | None:
    """A recipe number through the one validator: finite, and for `int` whole and within int64."""
    if hint is int:
        checked = check_number(f"recipe key {key}", value, integer=True, nullable=nullable)
        if checked is not None and not -(2**63) <= checked < 2**63:  # what torch and numpy take
            raise LongVAError(f"recipe key {key} must fit in 64 bits (at most {2**63 - 1:,}), got {shown_value(checked)}.")
        return checked
    if isinstance(value, str):
        try:  # PyYAML reads 1e-5 (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    checked = check_number(f"recipe key {key}", value, nullable=nullable)
    return None if checked is None else float(checked)


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
    module, _, name = _target(command).partition(":")
    return getattr(importlib.import_module(module), name)


def check_of(command: str) -> Callable[[Any], None]:
    """The value checks a command runs on its settings before any work: `check` of its schema's module."""
    module, _, _ = _target(command).partition(":")
    return importlib.import_module(module).check


def _target(command: str) -> str:
    if command not in SCHEMAS:
        raise LongVAError(f"no command {command!r} takes recipes; commands with recipes: {', '.join(sorted(SCHEMAS))}.")
    return SCHEMAS[command]


def pop_command(data: dict[str, Any], where: str | Path) -> str | None:
    """Remove the `command:` key of a recipe's mapping and return it (None when absent)."""
    command = data.pop(COMMAND_KEY, None)
    if command is not None and (not isinstance(command, str) or command not in SCHEMAS):
        raise LongVAError(
            f"recipe {where} names command {shown_value(command)}; it must be one of {', '.join(sorted(SCHEMAS))}."
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
    """(command, settings) of a recipe checked as the command checks it: its schema, then its
    `check`, without running anything.

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
    settings = build(schema_of(command), apply_overrides(data, list(overrides)))
    check_of(command)(settings)
    return command, settings


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
