"""The checks every input passes through, written once: numbers, text, and installed extras.

Command-line options, recipe keys, environment variables and HTTP request fields all name
numbers that must be finite, of the right type and in range, and text that must be valid
UTF-8. Each place calls these with its own name for the value (`--top-k`, `recipe key
optimizer.lr`, `LONGVA_CACHE_MAX_GB`, `temperature`), so the user is told exactly which value
is wrong, in the same words everywhere, and `longva recipes validate` refuses what the command
itself refuses.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from longva_cli.errors import LongVAError

# The range of a 64-bit integer: what torch takes as a seed, and a bound for any count, so that
# no value reaches torch or numpy and overflows there.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

def check_number(
    name: str,
    value,
    *,
    integer: bool = False,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
    nullable: bool = False,
):
    """`value` when it is a finite number (a whole one with `integer`) in the given range; else a
    LongVAError naming `name`, the range and the value. None passes only when `nullable`."""
    if value is None and nullable:
        return None
    bounds = []
    if above is not None:
        bounds.append(f"above {_shown(above)}")
    if at_least is not None:
        bounds.append(f"at least {_shown(at_least)}")
    if below is not None:
        bounds.append(f"below {_shown(below)}")
    if at_most is not None:
        bounds.append(f"at most {_shown(at_most)}")
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    # a Python int is always finite (and math.isfinite cannot take one past float's range)
    finite = is_number and (isinstance(value, int) or math.isfinite(value))
    ok = (
        finite
        and (not integer or isinstance(value, int) or float(value).is_integer())
        and (above is None or value > above)
        and (at_least is None or value >= at_least)
        and (below is None or value < below)
        and (at_most is None or value <= at_most)
    )
    if not ok:
        kind = "a whole number" if integer else "a finite number"
        wanted = kind + (f" {' and '.join(bounds)}" if bounds else "") + (" or null" if nullable else "")
        raise LongVAError(f"{name} must be {wanted}, got {shown_value(value)}.")
    return int(value) if integer else value


def check_flags(*flags: tuple[str, object, dict]) -> None:
    """`check_number` of each (flag, value, bounds) of a command line; a flag that was not given
    (None) keeps its default and is not checked."""
    for name, value, bounds in flags:
        if value is not None:
            check_number(name, value, **bounds)
def env_number(name: str, default: float, *, meaning: str, **bounds) -> float:
    """The number in environment variable `name` (`default` when unset), checked as
    `check_number` checks; `meaning` says in the error what the variable sets."""
    import os

    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        value = raw
    try:
        return check_number(name, value, **bounds)
    except LongVAError as err:
        raise LongVAError(f"{str(err).removesuffix('.')} ({meaning}); set it to a valid value or unset it.") from None


def _shown(bound: float) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def shown_value(value, limit: int = 60) -> str:
    """`repr(value)`, cut to `limit` characters: an error line stays one readable line."""
    if isinstance(value, int) and value.bit_length() > 3 * limit:  # (Python refuses repr past 4,300 digits)
        return f"a whole number of about {int(value.bit_length() * math.log10(2)):,} digits"
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 15]}... ({len(text):,} characters)"


def checked_text(text: str, name: str) -> str:
    """`text` when it can be written as UTF-8; a LongVAError naming `name` for lone surrogates
    (valid JSON escapes such as "\\ud800" that are not characters)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise LongVAError(
            f"{name} contains {text[err.start]!r} at character {err.start}, which is not a character (a lone UTF-16 surrogate); "
            "send valid Unicode text."
        ) from None
    return text


def read_text_file(path: Path, name: str, *, max_bytes: int | None = None) -> str:
    """The text of a UTF-8 file (a leading byte-order mark is dropped); a LongVAError naming
    `name` for a missing file, a file over `max_bytes`, or bytes that are not UTF-8."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise LongVAError(f"{name} {path} is {size:,} bytes, more than the {max_bytes:,} allowed; give a smaller file.")
        data = path.read_bytes()
    except FileNotFoundError:
        raise LongVAError(f"{name} {path} does not exist; check the path.") from None
    except IsADirectoryError:
        raise LongVAError(f"{name} {path} is a folder; give a text file.") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise LongVAError(
            f"{name} {path} is not UTF-8 text (byte {err.start} is 0x{data[err.start]:02x}); save it as UTF-8."
        ) from None


def require_extra(extra: str, modules: tuple[str, ...], needed_by: str) -> None:
    """One sentence naming the pip extra to install when a module of it is missing, said before
    anything imports it (the alternative is an import traceback from deep inside a run)."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise LongVAError(f"{needed_by} needs {' and '.join(missing)}, which {verb} not installed: pip install 'longva[{extra}]'.")
