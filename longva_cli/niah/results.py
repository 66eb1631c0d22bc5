"""The run folder: settings, results appended as they finish, and the original's output files.

    settings.json       what the run measures; a folder of other settings is refused
    items.jsonl         one line per scored needle (or text sample), appended at once
    results.jsonl       one line per finished cell, with its needles' predictions
    all_accuracies.json [{"Num. Frame": N, "Frame Depth": 20.0, "Score": 0.8}, ...]
    avg_accuracy.txt    Average Accuracy: x
    heatmap.png

Each line is written with one `write`, flushed and fsynced under an exclusive lock, so a
killed run (or several ranks writing at once) leaves whole lines, at worst one partial last
line, which is dropped when the folder is opened again.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from longva_cli.errors import LongVAError
from longva_cli.niah.settings import depth_label

SETTINGS = "settings.json"
ITEMS = "items.jsonl"
RESULTS = "results.jsonl"
ACCURACIES = "all_accuracies.json"
AVERAGE = "avg_accuracy.txt"
HEATMAP = "heatmap.png"

# all_accuracies.json keys of the original scripts, per mode: (size key, depth key)
OUTPUT_KEYS = {"video": ("Num. Frame", "Frame Depth"), "text": ("Context Length", "Document Depth")}
# results.jsonl key of the cell size, per mode
SIZE_KEYS = {"video": "num_frames", "text": "context_length"}


def append_line(path: Path, record: dict) -> None:
    """Append one JSON line durably: a single write under a lock, then fsync."""
    line = json.dumps(record, ensure_ascii=False) + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def read_lines(path: Path) -> list[dict]:
    """The complete JSON lines of a file; a trailing partial line (a killed write) is ignored."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
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


def write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def prepare_folder(folder: Path, mode: str, settings: dict, identity: dict, overwrite: bool) -> int:
    """Create or reopen a run folder; the number of finished cells in it.

    A folder measuring other settings is refused unless `overwrite`, which deletes its results.
    """
    folder.mkdir(parents=True, exist_ok=True)
    stored_path = folder / SETTINGS
    if overwrite:
        for name in (ITEMS, RESULTS, ACCURACIES, AVERAGE, HEATMAP):
            (folder / name).unlink(missing_ok=True)
    elif stored_path.is_file():
        stored = json.loads(stored_path.read_text())
        before = {"mode": stored.get("mode"), **stored.get("identity", {})}
        now = {"mode": mode, **identity}
        differ = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if differ:
            shown = ", ".join(f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in differ[:3])
            raise LongVAError(
                f"{folder} holds results of other settings ({shown}); add --overwrite to replace them, "
                "--resume to continue with the stored settings, or choose another --output."
            )
    write_atomic(stored_path, json.dumps({"mode": mode, "identity": identity, "settings": settings}, indent=2) + "\n")
    for name in (ITEMS, RESULTS):
        drop_partial_tail(folder / name)
    return len(read_lines(folder / RESULTS))


def stored_settings(folder: Path) -> tuple[str, dict]:
    """(mode, settings) of an existing run folder, for --resume."""
    path = folder / SETTINGS
    if not path.is_file():
        raise LongVAError(f"{folder} has no {SETTINGS}: there is no run to resume there; drop --resume to start one.")
    stored = json.loads(path.read_text())
    return stored["mode"], stored["settings"]


def accuracy_table(cells: list[dict], mode: str) -> list[dict]:
    """all_accuracies.json rows in the original's order (size, then depth)."""
    size_key, depth_key = OUTPUT_KEYS[mode]
    ordered = sorted(cells, key=lambda c: (c[SIZE_KEYS[mode]], c["depth"]))
    return [{size_key: c[SIZE_KEYS[mode]], depth_key: depth_label(c["depth"]), "Score": c["score"]} for c in ordered]


def write_outputs(folder: Path, mode: str, cells: list[dict], title: str | None = None) -> tuple[float, str | None]:
    """all_accuracies.json, avg_accuracy.txt and heatmap.png; (average, a warning when no plot was drawn)."""
    from longva_cli.niah.heatmap import INSTALL_HINT, draw_heatmap, plotting_available

    rows = accuracy_table(cells, mode)
    average = sum(row["Score"] for row in rows) / len(rows)
    write_atomic(folder / ACCURACIES, json.dumps(rows, indent=4) + "\n")
    write_atomic(folder / AVERAGE, f"Average Accuracy: {average}\n")
    if not plotting_available():
        return average, INSTALL_HINT
    draw_heatmap(rows, folder / HEATMAP, title)
    return average, None
