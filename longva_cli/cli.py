"""The `longva` executable: a Typer app whose commands live one per module.

Each module exposes `command`, a thin Typer function that parses and validates its
arguments and then calls a plain Python function of the same module. Heavy libraries
(torch, transformers) are imported inside those functions so `longva --help` stays fast.
"""

from __future__ import annotations

import errno
import functools
import inspect
import os
import sys

import typer
from rich.markup import escape

from longva_cli import __version__, ask, chat, download, recipes_cmd
from longva_cli.errors import Interrupted, LongVAError
from longva_cli.eval import cli as eval_cli
from longva_cli.niah import cli as niah_cli
from longva_cli.serve import cli as serve_cli
from longva_cli.train import align, extend_text

try:  # typer 0.26 and later carry their own copy of click, with its own exception classes
    from typer import TyperException as UsageProblem
except ImportError:
    from click import ClickException as UsageProblem

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


# Training commands take their `key=value` overrides as a trailing argument; what launchers append
# (deepspeed's --local_rank=N) lands there too instead of failing as an unknown option.
RECIPE_ARGS = {"ignore_unknown_options": True}

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
    """Make every help text plain text, shown as written, and flowing.

    Typer reads help as Rich markup, which swallows `[default: 200]` and `'longva[niah]'`; and it
    labels flags `<bool>` as if they took a value. Escape the markup and give flags no label, for
    `command` and everything under it (the help option included). Docstrings are wrapped in the
    source at about 95 columns: their paragraphs are joined into one line each, so Rich wraps
    them once, at the terminal's width, instead of breaking every source line again.
    """
    if command.help:
        command.help = escape(flowing(command.help))
    help_option = command.get_help_option(typer.Context(command, help_option_names=HELP_OPTION_NAMES))
    for param in [*command.params, *([help_option] if help_option else [])]:
        if getattr(param, "help", None):
            param.help = escape(param.help)
        if getattr(param, "is_flag", False):
            param.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        plain_help(sub)


def flowing(text: str) -> str:
    """`text` with each plain paragraph on one line; a paragraph with indented lines (examples,
    a JSON sample) keeps its line breaks."""
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(
        paragraph if any(line.startswith(" ") for line in paragraph.splitlines()) else " ".join(paragraph.split("\n"))
        for paragraph in paragraphs
    )


def report_interrupts(command) -> None:
    """Ctrl-C in any command becomes `Interrupted`: one line and exit status 130.

    Typer turns KeyboardInterrupt into a silent exit 130. Commands that keep finished work
    (niah, eval, training) raise `Interrupted` themselves, naming what was kept and the command
    that continues it; everything else says only that it stopped.
    """
    if command.callback is not None:
        command.callback = _interruptible(command.callback)
    for sub in getattr(command, "commands", {}).values():
        report_interrupts(sub)


def _interruptible(callback):
    @functools.wraps(callback)
    def run(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except KeyboardInterrupt:
            raise Interrupted("stopped by Ctrl-C.") from None

    return run


# Rich lays text out for 80 columns when no standard stream is a terminal (a script, CI, a
# notebook's `!longva ...`), which cut help lines and tables mid-phrase; there they get this many.
WIDTH_WITHOUT_TERMINAL = 200


def widen_without_terminal() -> None:
    if "COLUMNS" in os.environ or any(os.isatty(fd) for fd in (0, 1, 2)):
        return
    os.environ["COLUMNS"] = str(WIDTH_WITHOUT_TERMINAL)


def old_spellings(args: list[str]) -> list[str]:
    """`args` with last release's spellings replaced by this release's, each with a one-line
    notice on stderr. They keep working for one release:

    - `eval ppl --tokens-step` is `--token-step`, as in `niah text`;
    - `niah video|text --resume` takes the run folder, as in training; the bare switch (last,
      or followed by another option) still means the --output folder.
    """
    command, updated = args[:2], []
    for index, arg in enumerate(args):
        if command == ["eval", "ppl"] and arg.split("=", 1)[0] == "--tokens-step":
            print("note: --tokens-step is now --token-step; the old spelling goes in the next release.", file=sys.stderr)
            arg = "--token-step" + arg[len("--tokens-step"):]
        elif command in (["niah", "video"], ["niah", "text"]) and arg == "--resume" and (index + 1 == len(args) or args[index + 1].startswith("-")):
            print("note: --resume now takes the run folder (`--resume runs/niah-video`); the bare switch goes in the next release.", file=sys.stderr)
            updated += [arg, ""]  # "": the --output folder
            continue
        updated.append(arg)
    return updated


def fail(message: str, code: int = 1) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def main() -> None:
    """Run the CLI; user-facing errors become one line on stderr and a non-zero exit."""
    widen_without_terminal()
    command = typer.main.get_command(app)
    plain_help(command)
    report_interrupts(command)
    try:
        # Not standalone: usage errors come here to be said in one `error:` line, not in a box.
        status = command.main(old_spellings(sys.argv[1:]), prog_name="longva", standalone_mode=False)
    except UsageProblem as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # a bare group or command: its help is printed
            sys.exit(err.exit_code)
        where = f"; see `{err.ctx.command_path} --help`" if getattr(err, "ctx", None) else ""
        fail(f"{' '.join(err.format_message().split()).rstrip('.')}{where}.", err.exit_code)
    except typer.Abort:
        fail("aborted.")
    except Interrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except LongVAError as err:
        fail(str(err), err.exit_code)
    except MemoryError:
        fail("out of memory; use fewer frames, a smaller --prefill-chunk, or a machine with more memory.")
    except OSError as err:
        if err.errno == errno.ENOSPC:
            fail("the disk is full; free some space (finished results were kept) and run the command again.")
        where = f" ({err.filename})" if err.filename else ""
        fail(f"{err.strerror or err}{where}.")
    sys.exit(status if isinstance(status, int) else 0)
