"""A results folder that survives kills and refuses to mix settings: niah, eval and ppl runs.

    store = RunStore(folder, "settings.json")
    store.open(identity, overwrite=False, results=("items.jsonl", "results.jsonl"), settings=...)
    store.append("items.jsonl", record)       # one line, one write, under a lock, fsynced
    done = store.read("items.jsonl")          # the complete lines (a killed write's tail is dropped)

`identity` is what the results measure (model, grid, frames, ...): a folder holding results of
another identity is refused unless `overwrite`, which deletes them, so a rerun can never mix two
runs' results or silently destroy finished work. Several processes (torchrun ranks) may append
to one file at once: each line is written whole under an exclusive lock.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from longva_cli.errors import LongVAError


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so a crash never leaves half a file."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


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


def read_lines(path: Path) -> list[dict]:
    """The complete JSON lines of a file; a trailing partial line (a killed write) is ignored."""
    if not Path(path).is_file():
        return []
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def drop_partial_tail(path: Path) -> None:
    """Cut a killed write's partial last line, so the next append starts on a fresh line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as handle:
            handle.truncate(end)


class RunStore:
    """A run folder: one settings file naming what its results measure, and result files."""

    def __init__(self, folder: Path, settings_file: str = "settings.json") -> None:
        self.folder = Path(folder)
        self.settings_file = settings_file

    def path(self, name: str) -> Path:
        return self.folder / name

    def stored(self) -> dict | None:
        """The settings file's content, or None for a new folder."""
        path = self.path(self.settings_file)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise LongVAError(f"{path} is not valid JSON; delete the folder or pass --overwrite to start over.") from None

    def open(self, identity: dict, *, overwrite: bool, results: tuple[str, ...], resume_hint: str = "", **extra) -> None:
        """Create or reopen the folder for results of `identity` (see the module docstring)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        stored = self.stored()
        if overwrite:
            for name in results:
                self.path(name).unlink(missing_ok=True)
        elif stored is not None:
            before = stored.get("identity", {})
            differ = sorted(k for k in set(before) | set(identity) if before.get(k) != identity.get(k))
            if differ:
                shown = "; ".join(f"{k} = {before.get(k)!r}, not {identity.get(k)!r}" for k in differ[:3])
                raise LongVAError(
                    f"{self.folder} holds results of other settings ({shown}); add --overwrite to replace them"
                    f"{resume_hint}, or choose another --output."
                )
        kept = {k: v for k, v in (stored or {}).items() if k != "identity"} if not overwrite else {}
        write_json(self.path(self.settings_file), {**kept, "identity": identity, **extra})
        for name in results:
            drop_partial_tail(self.path(name))

    def note(self, **extra) -> None:
        """Add or replace entries beside the identity in the settings file (e.g. versions used)."""
        write_json(self.path(self.settings_file), {**(self.stored() or {}), **extra})

    def append(self, name: str, record: dict) -> None:
        append_line(self.path(name), record)

    def read(self, name: str) -> list[dict]:
        return read_lines(self.path(name))

    def write_json(self, name: str, data) -> None:
        write_json(self.path(name), data)
