"""`longva ask`: answer questions about a video or an image, streaming the answers to stdout.

Several questions about one media item share its encoding and its KV cache: the video is
decoded, encoded and prefilled once, then each question costs only its own tokens.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import List, Optional

import typer

from longva_cli import options
from longva_cli.console import EventDisplay, load_model, stderr
from longva_cli.errors import LongVAError
from longva_cli.hub import DEFAULT_MODEL

EMPTY_ANSWER = "the model ended its answer at once (0 tokens); try --temperature 0 or another --seed."


def read_questions(arguments: list[str], questions_file: str | None) -> list[str]:
    """The questions: arguments ('-' reads all of stdin as one question), then one per line of --questions."""
    questions = []
    for argument in arguments:
        questions.append(sys.stdin.read().strip() if argument == "-" else argument)
    if questions_file is not None:
        if questions_file == "-":
            text = sys.stdin.read()
        else:
            path = Path(questions_file).expanduser()
            if not path.is_file():
                raise LongVAError(f"--questions {path} does not exist; give a text file with one question a line, or '-' for stdin.")
            text = path.read_text(encoding="utf-8")
        questions += [line.strip() for line in text.splitlines() if line.strip()]
    if not questions:
        raise LongVAError("no question given; pass it after the media, through stdin with '-', or one a line with --questions FILE.")
    if any(not question.strip() for question in questions):
        raise LongVAError("a question is empty; give each question some text.")
    return questions


def ask(
    media: Path | None,
    questions: list[str],
    *,
    model: str = DEFAULT_MODEL,
    frames: int | None = None,
    fps: float | None = None,
    system: str | None = None,
    max_new_tokens: int = 1024,
    temperature: float = 0.5,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = 0,
    device: str = "auto",
    dtype: str = "auto",
    attn: str = "auto",
    device_map: str | None = None,
    quantize: str | None = None,
    revision: str | None = None,
    prefill_chunk: int = 4096,
    cache_dir: Path | None = None,
    use_cache: bool = True,
    stream: bool = True,
    on_answer=None,
):
    """Load `model` and answer each question about `media` (encoded and prefilled once).

    With `stream`, answers are written to stdout as they are generated (several questions are
    shown as "Q: ..." / "A: ..." blocks); `on_answer(answer)` gets each finished `Answer`.
    """
    from longva_cli.engine import MediaSpec, Session, drive
    from longva_cli.engine.visual_cache import disk_cache
    from longva_cli.model.prompt import DEFAULT_SYSTEM

    longva = load_model(model, device=device, dtype=dtype, attn=attn, device_map=device_map, quantize=quantize, revision=revision)
    specs = [MediaSpec(media, frames, fps)] if media is not None else []
    session = Session(
        longva, specs, system=DEFAULT_SYSTEM if system is None else system, cache=disk_cache(cache_dir, use_cache),
        prefill_chunk=prefill_chunk, keep_history=False,
    )
    sampling = longva.sampling_settings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
    sampling.seed = seed
    several = len(questions) > 1
    answers = []
    for number, question in enumerate(questions):
        display = EventDisplay(stream_text=stream)
        if stream and several:
            sys.stdout.write(("\n" if number else "") + f"Q: {question}\nA: ")
            sys.stdout.flush()
        try:
            answer = drive(session.ask(question, sampling), display)
        finally:
            display.close()
        if stream:
            sys.stdout.write("\n")
            sys.stdout.flush()
        if not answer.answer:
            stderr.print(f"[yellow]warning:[/yellow] {EMPTY_ANSWER}")
        if on_answer is not None:
            on_answer(answer)
        answers.append(answer)
        report(answer)
    return answers


def report(answer) -> None:
    """One dim line on stderr: what went in and how long each phase took."""
    t = answer.timings
    reused = f" ({answer.reused_tokens:,} reused)" if answer.reused_tokens else ""
    stderr.print(
        f"[dim]{answer.media_type or 'text'}: {answer.frames} {'frames' if answer.media_type == 'video' else 'crops'}, "
        f"{answer.visual_tokens:,} visual + {answer.prompt_tokens - answer.visual_tokens:,} text tokens{reused}; "
        f"encode {t.get('encode_s', 0):.1f}s, prefill {t.get('prefill_s', 0):.1f}s, "
        f"{answer.generated_tokens} tokens in {t.get('generate_s', 0):.1f}s[/dim]"
    )


def check_sampling_options(frames, fps, temperature, top_p, max_new_tokens, prefill_chunk) -> None:
    """One sentence per impossible value (NaN and infinity included), before anything loads."""
    if frames is not None and frames < 1:
        raise LongVAError(f"--frames must be at least 1, got {frames}.")
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise LongVAError(f"--fps must be positive (a number of frames a second), got {fps}.")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise LongVAError(f"--temperature must be 0 (greedy) or positive, got {temperature}.")
    if top_p is not None and not 0 < top_p <= 1:
        raise LongVAError(f"--top-p must be in (0, 1], got {top_p}.")
    if max_new_tokens < 1:
        raise LongVAError(f"--max-new-tokens must be at least 1, got {max_new_tokens}.")
    if prefill_chunk < 1:
        raise LongVAError(f"--prefill-chunk must be at least 1, got {prefill_chunk}.")


def command(
    media: Path = typer.Argument(..., help="A video or image file (recognised by content)."),
    question: Optional[List[str]] = typer.Argument(None, help="One or more questions; '-' reads one from standard input."),
    questions_file: Optional[str] = typer.Option(None, "--questions", help="A file with one question a line ('-': standard input)."),
    frames: Optional[int] = typer.Option(None, "--frames", "-n", help="Frames sampled uniformly from the video, 144 tokens each. [default: 32]"),
    fps: Optional[float] = typer.Option(
        None, "--fps", help="Sample this many frames per second instead; with --frames as a cap, the capped frames are spread over the whole video."
    ),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Checkpoint folder, hub id or short name."),
    max_new_tokens: int = typer.Option(1024, "--max-new-tokens", help="Most tokens to generate."),
    temperature: float = typer.Option(0.5, "--temperature", "-t", help="Sampling temperature; 0 = greedy (the original demo used 0.5)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling threshold (off by default, as in the original)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Top-k sampling (default: the checkpoint's generation config, else 50)."),
    seed: int = typer.Option(0, "--seed", help="Random seed for sampling."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt (default: 'You are a helpful assistant.'; '' for none)."),
    device: options.Device = "auto",
    dtype: options.Dtype = "auto",
    attn: options.Attention = "auto",
    device_map: options.DeviceMap = None,
    quantize: options.Quantize = None,
    revision: options.Revision = None,
    prefill_chunk: options.PrefillChunk = 4096,
    cache_dir: options.CacheDir = None,
    no_cache: options.NoCache = False,
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object per question (JSON Lines: answer, counts, timings) and nothing else on stdout."),
) -> None:
    """Answer questions about a video or an image.

    Answers stream to stdout; loading, progress and timing go to stderr. Several questions share
    the media's encoding and KV cache, and a second run on the same file reads its embeddings
    from the cache (--cache-dir) instead of decoding it again.

    examples:
      longva ask movie.mp4 "What happens after the car stops?" --frames 128
      longva ask movie.mp4 "Who drives?" "Where are they going?" "How does it end?"
      longva ask movie.mp4 --questions questions.txt --json > answers.jsonl
      longva ask photo.jpg "Describe the image in detail." --temperature 0
      echo "What colour is the car?" | longva ask clip.mp4 - --json | jq .answer
    """
    questions = read_questions(question or [], questions_file)
    check_sampling_options(frames, fps, temperature, top_p, max_new_tokens, prefill_chunk)
    from longva_cli.engine.encoder import media_kind

    media_kind(media)  # bad media fails before any model is loaded
    ask(
        media,
        questions,
        model=model,
        frames=frames,
        fps=fps,
        system=system,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        device=device,
        dtype=dtype,
        attn=attn,
        device_map=device_map,
        quantize=quantize,
        revision=revision,
        prefill_chunk=prefill_chunk,
        cache_dir=cache_dir,
        use_cache=not no_cache,
        stream=not json_output,
        on_answer=(lambda answer: typer.echo(answer.to_json())) if json_output else None,
    )
