"""What a command shows while the engine works: a model loading under a spinner, then one line;
engine events as progress bars and streamed answer text.

The engine hands back values and events and prints nothing; this is where they meet the terminal
(`console.py` holds the terminal itself).
"""

import sys

from rich.progress import Progress

from longva_cli.console import escape, progress, stderr

# The engine is imported inside the functions: it brings torch, and `longva --help` must not.


def load_model(name: str, *, kind: str = "longva", **options):
    """`engine.load` with a spinner and a one-line report on stderr (for CLI commands)."""
    from longva_cli.engine.loader import load

    with stderr.status(f"Loading {name}"):
        model = load(name, kind=kind, **options)
    network = model.model if kind == "longva" else model.language_model
    device = network.device if kind == "longva" else network.get_input_embeddings().weight.device
    stderr.print(f"Loaded {name} in {getattr(model, 'load_seconds', 0.0):.1f}s on {device} ({network.dtype}).")
    return model


def say_plan(line: str) -> None:
    """The memory plan's one line (engine/plan.py `fit_budget`), dim on stderr."""
    stderr.print(f"[dim]{line}[/dim]")


class EventDisplay:
    """Shows engine events: progress bars (encoding, prefill) and notices on stderr, answer text
    on stdout as it is generated (`stream_text`). Call `close()` when the work is done."""

    def __init__(self, stream_text: bool = True) -> None:
        self.stream_text = stream_text
        self.bar: Progress | None = None
        self.task = None
        self.task_name: str | None = None

    def __call__(self, event) -> None:
        from longva_cli.engine.encoder import Encoding
        from longva_cli.engine.objectives import Notice, Prefilling, Token

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
