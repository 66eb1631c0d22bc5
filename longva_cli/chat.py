"""`longva chat`: a multi-turn conversation about a video or an image in the terminal.

The media is encoded once and the conversation's KV cache is kept between turns, so each turn
prefills only its own new tokens: a follow-up question about an hour-long video is answered as
fast as a question about no video at all. Questions come from the keyboard, or one a line from
a pipe; answers go to stdout.
"""

from __future__ import annotations

import sys
from pathlib import Path
import typer

from longva_cli import options
from longva_cli.ask import EMPTY_ANSWER, MAX_QUESTION_CHARS, AskSettings, check_question, checked_settings
from longva_cli.console import escape, stderr
from longva_cli.display import EventDisplay
from longva_cli.errors import LongVAError

COMMANDS = (
    "/reset forgets the conversation, /save FILE writes it as JSON (/save! FILE replaces an existing file), "
    "Ctrl-D (or /exit) leaves"
)


def next_line(interactive: bool) -> str | None:
    """The user's next line, or None at the end of input (Ctrl-D, end of the pipe). A piped
    line is read no further than a question may be long, so a huge one costs no memory."""
    if interactive:
        try:
            return input("you> ")
        except EOFError:
            return None
    line = sys.stdin.readline(MAX_QUESTION_CHARS + 1)
    rest = line
    while len(rest) > MAX_QUESTION_CHARS and not rest.endswith("\n"):  # drain a too-long line; `chat` refuses its start
        rest = sys.stdin.readline(MAX_QUESTION_CHARS + 1)
    return None if line == "" else line


def save(session, command: str, target: str, turns: int) -> None:
    """`/save FILE` or `/save! FILE`: one line on stderr whatever happens; the chat goes on."""
    if not target:
        stderr.print("[yellow]usage:[/yellow] /save FILE (or /save! FILE to replace an existing file)")
        return
    try:
        session.save(Path(target).expanduser(), overwrite=command == "/save!")
    except FileExistsError:
        stderr.print(f"[yellow]not saved:[/yellow] {escape(target)} already exists; /save! {escape(target)} replaces it.")
    except LongVAError as err:
        stderr.print(f"[yellow]not saved:[/yellow] {escape(str(err))}")
    else:
        stderr.print(f"[dim]saved {turns} turns to {escape(target)}[/dim]")


def chat(media: Path, settings: AskSettings = AskSettings(), *, json_output: bool = False) -> int:
    """Run the conversation until the input ends; the number of turns answered."""
    from longva_cli.engine.objectives import drive

    session, sampling = settings.open(media, keep_history=True)
    display = EventDisplay(stream_text=False)
    try:
        visuals = drive(session.encode(), display)  # before the first question, so it is answered at once
    finally:
        display.close()
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401 - line editing and history for input()

        stderr.print(f"[dim]{media.name}: {visuals[0].images} {'frames' if visuals[0].kind == 'video' else 'crops'} encoded; {COMMANDS}.[/dim]")
    turns = 0
    while (line := next_line(interactive)) is not None:
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            stderr.print("[dim]conversation cleared; the media stays encoded.[/dim]")
            continue
        command, _, target = text.partition(" ")
        if command in ("/save", "/save!"):
            save(session, command, target.strip(), turns)
            continue
        try:
            check_question(text, "this line")
        except LongVAError as err:
            stderr.print(f"[yellow]skipped:[/yellow] {err}")
            continue
        if text.startswith("/"):
            stderr.print(f"[yellow]unknown command {text.split()[0]}:[/yellow] {COMMANDS}.")
            continue
        display = EventDisplay(stream_text=not json_output)
        try:
            answer = drive(session.ask(text, sampling), display)
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the conversation
            display.close()
            sys.stdout.write("\n")
            stderr.print("[dim](stopped; the turn was dropped)[/dim]")
            continue
        finally:
            display.close()
        if json_output:
            typer.echo(answer.to_json())
        else:
            sys.stdout.write("\n")
            sys.stdout.flush()
        if not answer.answer:
            stderr.print(f"[yellow]warning:[/yellow] {EMPTY_ANSWER}")
        turns += 1
    return turns


@options.composed
def command(
    media: Path = typer.Argument(..., help="A video or image file (recognised by content)."),
    *,
    media_sampling: options.MediaSampling,
    model: options.Model = AskSettings.model,
    sampling: options.Sampling,
    loading: options.Loading,
    memory_budget: options.MemoryBudget = None,
    revision: options.Revision = None,
    prefill_chunk: options.PrefillChunk = AskSettings.prefill_chunk,
    cache: options.EmbeddingCache,
    json_output: bool = typer.Option(False, "--json", help="Print each answer as one JSON line instead of text."),
) -> None:
    """Chat about a video or an image: several turns, the history kept in the KV cache.

    Type a question and press Enter; /reset starts over (the media stays encoded), /save FILE
    writes the conversation as JSON (/save! FILE replaces an existing file), Ctrl-D leaves. In a
    pipe, each input line is one turn.

    examples:
      longva chat movie.mp4 --frames 128
      printf 'What happens?\\nWhy?\\n' | longva chat clip.mp4 --temperature 0
    """
    settings = checked_settings(
        media, media_sampling, sampling, loading, cache, model=model, memory_budget=memory_budget, revision=revision,
        prefill_chunk=prefill_chunk,
    )
    chat(media, settings, json_output=json_output)
