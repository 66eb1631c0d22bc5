"""The `longva` executable: a Typer app whose commands live one per module.

Each module exposes `command`, a thin Typer function that parses and validates its
arguments and then calls a plain Python function of the same module. Heavy libraries
(torch, transformers) are imported inside those functions so `longva --help` stays fast.
"""

from __future__ import annotations

import errno
import sys

import typer
from rich.markup import escape

from longva_cli import __version__, ask, chat, download, recipes_cmd
from longva_cli.errors import LongVAError
from longva_cli.eval import cli as eval_cli
from longva_cli.niah import cli as niah_cli
from longva_cli.serve import cli as serve_cli
from longva_cli.train import align, extend_text

HELP_OPTION_NAMES = ["-h", "--help"]

app = typer.Typer(
    name="longva",
    help="LongVA: ask questions about hour-long videos, run V-NIAH, train and serve long-context video models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": HELP_OPTION_NAMES},
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"longva {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", "-V", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """LongVA: ask questions about hour-long videos, run V-NIAH, train and serve long-context video models."""


# Training commands take a recipe plus free-form dotted `key=value` overrides.
RECIPE_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}

app.command("ask", no_args_is_help=True)(ask.command)
app.command("chat", no_args_is_help=True)(chat.command)
app.command("download")(download.command)
app.command("serve")(serve_cli.command)
app.add_typer(niah_cli.app, name="niah")
app.command("extend-text", no_args_is_help=True, context_settings=RECIPE_ARGS)(extend_text.command)
app.command("align", no_args_is_help=True, context_settings=RECIPE_ARGS)(align.command)
app.add_typer(eval_cli.app, name="eval")
app.add_typer(recipes_cmd.app, name="recipes")


def plain_help(command) -> None:
    """Make every help text plain text, shown as written.

    Typer reads help as Rich markup, which swallows `[default: 200]` and `'longva[niah]'`; and it
    labels flags `<bool>` as if they took a value. Escape the markup and give flags no label, for
    `command` and everything under it (the help option included).
    """
    if command.help:
        command.help = escape(command.help)
    help_option = command.get_help_option(typer.Context(command, help_option_names=HELP_OPTION_NAMES))
    for param in [*command.params, *([help_option] if help_option else [])]:
        if getattr(param, "help", None):
            param.help = escape(param.help)
        if getattr(param, "is_flag", False):
            param.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        plain_help(sub)


def fail(message: str, code: int = 1) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def main() -> None:
    """Run the CLI; user-facing errors become one line on stderr and a non-zero exit."""
    command = typer.main.get_command(app)
    plain_help(command)
    try:
        command(prog_name="longva")
    except LongVAError as err:
        fail(str(err), err.exit_code)
    except KeyboardInterrupt:
        fail("interrupted; finished work was kept, run the same command again to continue.", 130)
    except MemoryError:
        fail("out of memory; use fewer frames, a smaller --prefill-chunk, or a machine with more memory.")
    except OSError as err:
        if err.errno == errno.ENOSPC:
            fail("the disk is full; free some space (finished results were kept) and run the command again.")
        if err.errno == errno.EPIPE:
            sys.exit(0)  # the reader of our stdout went away (e.g. `| head`): not an error
        where = f" ({err.filename})" if err.filename else ""
        fail(f"{err.strerror or err}{where}.")
