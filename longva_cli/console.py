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


def load_model(name: str, *, kind: str = "longva", **options):
    """`engine.load` with a spinner and a one-line report on stderr (for CLI commands)."""
    from longva_cli.engine.loader import load

    with stderr.status(f"Loading {name}"):
        model = load(name, kind=kind, **options)
    network = model.model if kind == "longva" else model.language_model
    device = network.device if kind == "longva" else network.get_input_embeddings().weight.device
    stderr.print(f"Loaded {name} in {getattr(model, 'load_seconds', 0.0):.1f}s on {device} ({network.dtype}).")
    return model


class EventDisplay:
    """Shows engine events: progress bars (encoding, prefill) and notices on stderr, answer text
    on stdout as it is generated (`stream_text`). Call `close()` when the work is done."""

    def __init__(self, stream_text: bool = True) -> None:
        self.stream_text = stream_text
        self.bar: Progress | None = None
        self.task = None
        self.task_name: str | None = None

    def __call__(self, event) -> None:
        from longva_cli.engine import Encoding, Notice, Prefilling, Token

        if isinstance(event, Encoding):
            self._advance("Encoding frames", "frames", event.done, event.total)
        elif isinstance(event, Prefilling):
            self._advance("Prefilling", "tok", event.done, event.total)
        elif isinstance(event, Token):
            self.close()
            if self.stream_text and event.text:
                sys.stdout.write(event.text)
                sys.stdout.flush()
        elif isinstance(event, Notice):
            stderr.print(f"[yellow]warning:[/yellow] {escape(event.message)}")

    def _advance(self, description: str, unit: str, done: int, total: int) -> None:
        if self.task_name != description:  # one bar per phase, each with its own unit
            self.close()
            self.bar = progress(unit=unit, transient=True)
            self.bar.start()
            self.task = self.bar.add_task(description, total=total)
            self.task_name = description
        self.bar.update(self.task, completed=done, total=total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        self.bar, self.task, self.task_name = None, None, None
