"""The run folder: settings, results appended as they finish, and the original's output files.

    settings.json       what the run measures; a folder of other settings is refused
    items.jsonl         one line per scored needle (or text sample), appended at once
    results.jsonl       one line per finished cell, with its needles' predictions
    all_accuracies.json [{"Num. Frame": N, "Frame Depth": 20.0, "Score": 0.8}, ...]
    avg_accuracy.txt    Average Accuracy: x
    heatmap.png

The folder is an engine `RunStore`: each line is written with one `write`, flushed and fsynced
under an exclusive lock, so a killed run (or several ranks writing at once) leaves whole lines,
at worst one partial last line. Opening the folder again sets every damaged line aside (a torn
tail, bytes that are not UTF-8, a line that is not a needle's or a cell's record) and says so;
what it held is scored again, and every good line is kept.
"""

from __future__ import annotations

import json
from pathlib import Path

from longva_cli.engine.runs import RunStore, write_atomic
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


def line_fields(mode: str) -> dict[str, tuple[str, ...]]:
    """The fields every line of items.jsonl and results.jsonl must have to be used."""
    size_key = SIZE_KEYS[mode]
    return {ITEMS: (size_key, "depth", "index", "found"), RESULTS: (size_key, "depth", "score")}


def run_store(folder: Path, mode: str) -> RunStore:
    """The run folder as a `RunStore` that knows what each of its JSONL files' lines must hold."""
    return RunStore(folder, SETTINGS, fields=line_fields(mode))


def prepare_folder(folder: Path, mode: str, settings: dict, identity: dict, overwrite: bool) -> int:
    """Create or reopen a run folder; the number of finished cells in it.

    A folder measuring other settings is refused unless `overwrite`, which deletes its results.
    """
    store = run_store(folder, mode)
    store.open(
        {"mode": mode, **identity}, overwrite=overwrite, results=(ITEMS, RESULTS, ACCURACIES, AVERAGE, HEATMAP),
        resume_hint=f", --resume {folder} to continue with the stored settings", mode=mode, settings=settings,
    )
    return len(store.read(RESULTS))


def stored_settings(folder: Path) -> tuple[str, dict]:
    """(mode, settings) of an existing run folder, for --resume."""
    stored = RunStore(folder, SETTINGS).stored()
    if stored is None:
        raise LongVAError(f"{folder} has no {SETTINGS}: there is no run to resume there; drop --resume to start one.")
    if stored.get("mode") not in SIZE_KEYS or not isinstance(stored.get("settings"), dict):
        raise LongVAError(f"{folder / SETTINGS} names no niah mode and settings; start the run again with --overwrite.")
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
