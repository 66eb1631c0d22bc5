"""Shared terminal output, by one rule for every command.

stdout carries what the user asked for: an answer, a listing, a result table, a path written
(`--json`, where a command has it, puts a machine-readable form there instead). stderr carries
everything else: loading lines, progress, warnings and summaries of side work, so that
`longva ... | grep`, `> file` and `$(longva ...)` see only the result.
"""

import contextlib
import shlex
import sys
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from longva_cli.errors import Interrupted

# Status lines are never re-wrapped (the terminal wraps what is too long; a log keeps whole lines).
stderr = Console(stderr=True, highlight=False, soft_wrap=True)
stdout = Console(highlight=False)


@contextlib.contextmanager
def on_interrupt(kept: Callable[[], str]) -> Iterator[None]:
    """Ctrl-C inside the block becomes `Interrupted(kept())`: one line saying what was kept and
    the command that continues the work (the CLI prints it and exits with 130)."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(kept()) from None


def this_command(*, drop: tuple[str, ...] = (), drop_with_value: tuple[str, ...] = (), add: tuple[str, ...] = ()) -> str:
    """The command line that started this process, as `longva ...` (also under `python -m
    longva_cli`), without the flags in `drop` and the options in `drop_with_value` (with their
    values), followed by `add`: the command to print for continuing a stopped run."""
    args, kept = sys.argv[1:], []
    index = 0
    while index < len(args):
        arg = args[index]
        name = arg.split("=", 1)[0]
        if name in drop:
            index += 1
        elif name in drop_with_value:
            index += 1 if "=" in arg else 2
        else:
            kept.append(arg)
            index += 1
    return shlex.join(["longva", *kept, *add])


class RateColumn(ProgressColumn):
    """Items per second, in the caller's unit (frames/s, cells/s, tok/s)."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        shown = "?" if speed is None else f"{speed:,.1f}"
        return Text(f"{shown} {self.unit}/s", style="progress.data.speed")


def progress(unit: str = "it", transient: bool = False) -> Progress:
    """A progress bar on stderr with count, rate, elapsed time and ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=stderr,
        transient=transient,
    )
