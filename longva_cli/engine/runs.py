"""A results folder that survives kills and refuses to mix settings: niah, eval and ppl runs.

    store = RunStore(folder, "settings.json", fields={"items.jsonl": ("id",)})
    store.open(identity, overwrite=False, results=("items.jsonl", "results.jsonl"), settings=...)
    store.append("items.jsonl", record)       # one line, one write, under a lock, fsynced
    done = store.read("items.jsonl")          # every good line

`identity` is what the results measure (model, grid, frames, ...): a folder holding results of
another identity is refused unless `overwrite`, which deletes them, so a rerun can never mix two
runs' results or silently destroy finished work. Several processes (torchrun ranks) may append
to one file at once: each line is written whole under an exclusive lock.

A line can still be damaged: a kill tears the last one, a bad disk or an editor leaves bytes
that are not UTF-8, not JSON, or not an object with the fields the run needs. `open` reads every
line, keeps every good one and moves each bad one, bytes unchanged, into a side file
(`items.jsonl.damaged`), saying so in one line; the results they held are recomputed. Reading
never stops at a bad line: a result after it is never lost or computed twice.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from longva_cli.errors import LongVAError


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write through a temporary file beside `path` and rename, so a crash or a full disk never
    leaves half a file (the temporary file is removed when the write fails)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_json(path: Path, data) -> None:
    write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def append_line(path: Path, record: dict) -> None:
    """Append one JSON line durably: a single write under an exclusive lock, then fsync."""
    line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def parse_line(line: bytes, fields: tuple[str, ...] = ()) -> dict | None:
    """The JSON object a line holds, when it is whole (ends in a newline), UTF-8, and has `fields`; else None."""
    if not line.endswith(b"\n"):
        return None
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(record, dict) or any(name not in record for name in fields):
        return None
    return record


def split_lines(data: bytes, fields: tuple[str, ...] = ()) -> tuple[list[dict], list[bytes], list[bytes]]:
    """(records, their lines, the bad lines) of a JSONL file's bytes; blank lines are neither."""
    records, good, bad = [], [], []
    lines = [line + b"\n" for line in data.split(b"\n")]  # only a newline ends a line (not a stray \r)
    lines[-1] = lines[-1][:-1]  # what follows the last newline: a torn line, or nothing
    for line in lines:
        if not line.strip():
            continue
        record = parse_line(line, fields)
        if record is None:
            bad.append(line)
        else:
            records.append(record)
            good.append(line)
    return records, good, bad


def read_lines(path: Path, fields: tuple[str, ...] = ()) -> list[dict]:
    """The good lines of a JSONL file, each a JSON object with `fields`; bad ones (see
    `set_aside_damaged`) and a line still being written are skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    return split_lines(path.read_bytes(), fields)[0]


def set_aside_damaged(path: Path, fields: tuple[str, ...] = ()) -> int:
    """Move every bad line of a JSONL file (torn, not UTF-8, not JSON, not an object with
    `fields`) into `<name>.damaged` beside it, bytes unchanged, and rewrite the file with the
    good ones, so appends continue on a clean line; says so on stderr. Returns how many."""
    path = Path(path)
    if not path.is_file():
        return 0
    _, good, bad = split_lines(path.read_bytes(), fields)
    if not bad:
        return 0
    side = path.with_name(path.name + ".damaged")
    with open(side, "ab") as handle:  # earlier repairs' lines stay
        handle.writelines(line if line.endswith(b"\n") else line + b"\n" for line in bad)
    write_atomic(path, b"".join(good))
    from longva_cli.console import escape, stderr

    count, held = (f"{len(bad)} damaged lines", "they") if len(bad) > 1 else ("1 damaged line", "it")
    stderr.print(
        f"[yellow]warning:[/yellow] set aside {count} of {escape(str(path))} into {escape(str(side))}; what {held} held will be computed again.",
        soft_wrap=True,
    )
    return len(bad)


class RunStore:
    """A run folder: one settings file naming what its results measure, and result files."""

    def __init__(self, folder: Path, settings_file: str = "settings.json", fields: dict[str, tuple[str, ...]] | None = None) -> None:
        self.folder = Path(folder)
        self.settings_file = settings_file
        self.fields = fields or {}  # JSONL file -> the fields each of its lines must have

    def path(self, name: str) -> Path:
        return self.folder / name

    def stored(self) -> dict | None:
        """The settings file's content, or None for a new folder."""
        path = self.path(self.settings_file)
        if not path.is_file():
            return None
        try:
            stored = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            stored = None
        if not isinstance(stored, dict):
            raise LongVAError(f"{path} is not a JSON object of settings; delete the folder or pass --overwrite to start over.")
        return stored

    def open(self, identity: dict, *, overwrite: bool, results: tuple[str, ...], resume_hint: str = "", **extra) -> None:
        """Create or reopen the folder for results of `identity` (see the module docstring)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        stored = None if overwrite else self.stored()
        if overwrite:
            for name in results:
                self.path(name).unlink(missing_ok=True)
                self.path(name + ".damaged").unlink(missing_ok=True)
        elif stored is not None:
            before = stored.get("identity", {})
            differ = sorted(k for k in set(before) | set(identity) if before.get(k) != identity.get(k))
            if differ:
                shown = "; ".join(f"{k} = {before.get(k)!r}, not {identity.get(k)!r}" for k in differ[:3])
                raise LongVAError(
                    f"{self.folder} holds results of other settings ({shown}); add --overwrite to replace them"
                    f"{resume_hint}, or choose another --output."
                )
        kept = {k: v for k, v in (stored or {}).items() if k != "identity"}
        write_json(self.path(self.settings_file), {**kept, "identity": identity, **extra})
        for name in results:
            if name.endswith(".jsonl"):
                set_aside_damaged(self.path(name), self.fields.get(name, ()))

    def note(self, **extra) -> None:
        """Add or replace entries beside the identity in the settings file (e.g. versions used)."""
        write_json(self.path(self.settings_file), {**(self.stored() or {}), **extra})

    def append(self, name: str, record: dict) -> None:
        append_line(self.path(name), record)

    def read(self, name: str) -> list[dict]:
        return read_lines(self.path(name), self.fields.get(name, ()))

    def write_json(self, name: str, data) -> None:
        write_json(self.path(name), data)
