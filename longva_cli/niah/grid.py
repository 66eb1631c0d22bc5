"""The loop over a NIAH grid: resumable, ordered for KV reuse, split over ranks.

A grid is cells (size, depth); a cell is scored by several units (V-NIAH: one per needle;
text: one per sample). Units run in the order that lets consecutive sequences share the
longest prefix; each scored unit is appended to items.jsonl at once and a cell's line goes to
results.jsonl as soon as its last unit is in, so a killed run loses at most the unit it was
scoring, and a restart skips everything already written.

Under torchrun every rank takes cells i % world_size of the sorted cell list (data parallel:
one whole sequence per GPU) and appends to the same files under a lock; rank 0 writes the
outputs once all ranks are done.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from longva_cli.errors import LongVAError
from longva_cli.niah.results import ITEMS, RESULTS, SIZE_KEYS, run_store
from longva_cli.parallel.ranks import ParallelState


@dataclass(frozen=True)
class Unit:
    size: int  # frames (video) or haystack tokens (text)
    depth: float
    index: int  # needle (video) or sample (text) within the cell
    order: tuple  # units run sorted by this, so that neighbours share long prefixes

    @property
    def cell(self) -> tuple[int, float]:
        return (self.size, self.depth)


def writes(ranks: ParallelState) -> bool:
    """Whether this rank writes results (one rank of each sequence-parallel group)."""
    return ranks.sp_rank == 0


def my_cells(ranks: ParallelState, cells: list[tuple[int, float]]) -> set[tuple[int, float]]:
    """The cells this rank's group scores: every n-th of the sorted cells, n = the number of groups."""
    return set(sorted(cells)[ranks.dp_rank :: ranks.dp_world_size])


def check_device_map(ranks: ParallelState, device_map: str | None) -> None:
    """A model spread over all GPUs leaves none for other ranks: one or the other."""
    if device_map is not None and ranks.world_size > 1:
        raise LongVAError("--device-map auto spreads one model over every GPU; run it as one process, not under torchrun.")


def run_units(
    units: list[Unit],
    score: Callable[[Unit], dict],
    folder: Path,
    mode: str,
    ranks: ParallelState,
    on_start: Callable[[int, int, int], None] | None = None,
    on_unit: Callable[[], None] | None = None,
) -> int:
    """Score this rank's unfinished units in order; the number scored now.

    `on_start(units to score, cells finished before, cells)` is called once the folder is read.
    """
    size_key = SIZE_KEYS[mode]
    store = run_store(folder, mode)
    units_per_cell = Counter(unit.cell for unit in units)
    finished = {(row[size_key], row["depth"]) for row in store.read(RESULTS)}
    items: dict[tuple[int, float], dict[int, dict]] = {}
    for row in store.read(ITEMS):
        items.setdefault((row[size_key], row["depth"]), {})[row["index"]] = row

    def finish_if_complete(cell: tuple[int, float]) -> None:
        done = items.get(cell, {})
        if cell in finished or len(done) < units_per_cell[cell]:
            return
        records = [{k: v for k, v in done[i].items() if k not in (size_key, "depth")} for i in sorted(done)]
        score_value = sum(r["found"] for r in records) / len(records)
        store.append(RESULTS, {size_key: cell[0], "depth": cell[1], "score": score_value, "items": records})
        finished.add(cell)

    mine = my_cells(ranks, list(units_per_cell))
    for cell in sorted(mine) if writes(ranks) else []:
        finish_if_complete(cell)  # all its units were written before a kill, its line was not
    todo = [u for u in units if u.cell in mine and u.cell not in finished and u.index not in items.get(u.cell, {})]
    todo.sort(key=lambda u: u.order)
    ranks.barrier()  # ranks that score together must all have read the files before any writes
    if on_start:
        on_start(len(todo), len(finished & set(units_per_cell)), len(units_per_cell))
    for unit in todo:
        record = {size_key: unit.size, "depth": unit.depth, "index": unit.index, **score(unit)}
        items.setdefault(unit.cell, {})[unit.index] = record
        if writes(ranks):
            store.append(ITEMS, record)
            finish_if_complete(unit.cell)
        if on_unit:
            on_unit()
    return len(todo)


def finished_cells(folder: Path, mode: str) -> list[dict]:
    """The cell lines of results.jsonl (one per cell, the first if a cell was written twice)."""
    size_key = SIZE_KEYS[mode]
    cells = {}
    for row in run_store(folder, mode).read(RESULTS):
        cells.setdefault((row[size_key], row["depth"]), row)
    return list(cells.values())


@dataclass
class GridRun:
    """What a finished run reports (rank 0 only)."""

    folder: Path
    mode: str
    cells: list[dict]
    average: float
    scored_now: int
    tokens_forwarded: int
    warning: str | None = None


def score_grid(
    units: list[Unit],
    score: Callable[[Unit], dict],
    folder: Path,
    mode: str,
    ranks: ParallelState,
    title: str,
    tokens_forwarded: Callable[[], int] = lambda: 0,
) -> GridRun | None:
    """Run the units with a progress bar on rank 0, then (rank 0) write the output files."""
    from longva_cli.console import progress, stderr
    from longva_cli.niah.results import write_outputs

    bar = progress(unit="needles" if mode == "video" else "samples") if ranks.is_main else None
    task = None

    def start(total: int, cells_done: int, cells: int) -> None:
        nonlocal task
        if bar is None:
            return
        if total == 0:  # a finished run resumed: no empty 0/0 bar
            stderr.print(f"[dim]{folder}: every cell is already scored; writing the outputs again.[/dim]")
            return
        if total < len(units):  # some needles are in the folder already
            stderr.print(f"resuming: {cells_done} of {cells} cells done in {folder}")
        bar.start()
        task = bar.add_task(f"{mode} NIAH", total=total)

    def advance() -> None:
        if bar:
            bar.advance(task)

    try:
        scored = run_units(units, score, folder, mode, ranks, on_start=start, on_unit=advance)
    finally:
        if bar:
            bar.stop()
    ranks.barrier()
    ranks.close()
    if not ranks.is_main:
        return None
    cells = finished_cells(folder, mode)
    average, warning = write_outputs(folder, mode, cells, title)
    return GridRun(folder, mode, cells, average, scored, tokens_forwarded(), warning)
