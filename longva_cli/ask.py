"""`longva ask`: answer questions about a video or an image, streaming the answers to stdout.

Several questions about one media item share its encoding and its KV cache: the video is
decoded, encoded and prefilled once, then each question costs only its own tokens.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import typer

from longva_cli import defaults, options
from longva_cli.checks import INT64_MAX, INT64_MIN, check_flags
from longva_cli.console import stderr
from longva_cli.display import EventDisplay, load_model, say_plan
from longva_cli.errors import LongVAError
from longva_cli.hub import DEFAULT_MODEL

EMPTY_ANSWER = "the model ended its answer at once (0 tokens); try --temperature 0 or another --seed."


# Longer than LongVA's whole 224K-token context holds of ordinary text (about 4 characters a
# token): such a question can never be answered, and tokenizing it alone would take gigabytes.
MAX_QUESTION_CHARS = 1_000_000
MAX_QUESTIONS_FILE_BYTES = 256 * 2**20


def check_question(question: str, where: str) -> str:
    """`question` when it is no longer than MAX_QUESTION_CHARS; else one sentence naming `where`."""
    if len(question) > MAX_QUESTION_CHARS:
        raise LongVAError(
            f"{where} has more than the {MAX_QUESTION_CHARS:,} characters a question may have (more than LongVA's "
            "224K-token context holds); shorten it."
        )
    return question


def read_stdin_question() -> str:
    """All of standard input as one question, reading no more than a question may hold."""
    return check_question(sys.stdin.read(MAX_QUESTION_CHARS + 1).strip(), "the question on standard input")


def read_questions(arguments: list[str], questions_file: str | None) -> list[str]:
    """The questions: arguments ('-' reads all of stdin as one question), then one per line of
    --questions (UTF-8 text, each line at most MAX_QUESTION_CHARS)."""
    from longva_cli.checks import read_text_file

    questions = []
    for number, argument in enumerate(arguments, 1):
        questions.append(read_stdin_question() if argument == "-" else check_question(argument, f"question {number}"))
    if questions_file is not None:
        if questions_file == "-":
            text = sys.stdin.read(MAX_QUESTIONS_FILE_BYTES + 1)
            if len(text) > MAX_QUESTIONS_FILE_BYTES:
                raise LongVAError(f"--questions - gave more than {MAX_QUESTIONS_FILE_BYTES:,} characters; split the questions over several runs.")
        else:
            text = read_text_file(Path(questions_file).expanduser(), "--questions", max_bytes=MAX_QUESTIONS_FILE_BYTES)
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                questions.append(check_question(line.strip(), f"line {number} of --questions"))
    if not questions:
        raise LongVAError("no question given; pass it after the media, through stdin with '-', or one a line with --questions FILE.")
    if any(not question.strip() for question in questions):
        raise LongVAError("a question is empty; give each question some text.")
    return questions


@dataclass
class AskSettings(options.Loading, options.Sampling, options.MediaSampling):
    """What `ask` and `chat` share: how the media is sampled, how answers are sampled, the model
    and how to load it, and the visual cache. `check()` before loading anything.

    The groups' fields come first (frames, fps, max_new_tokens, ..., device, ...), each with the
    default its option shows; all are plain keywords: `AskSettings(device="cpu", frames=8)`.
    """

    model: str = DEFAULT_MODEL
    memory_budget: str | None = None  # None: the device's free memory
    revision: str | None = None
    prefill_chunk: int = defaults.PREFILL_CHUNK
    cache_dir: Path | None = None
    use_cache: bool = True

    def check(self) -> None:
        """One sentence per impossible value (NaN, infinity, a seed torch cannot take, a float
        where a whole number belongs); see `checks.check_number`. A temperature too small to
        sample at is fine: it decodes greedily (`SamplingSettings.greedy`)."""
        whole = {"integer": True, "at_least": 1}
        check_flags(
            ("--frames", self.frames, whole),
            ("--fps", self.fps, {"above": 0}),
            ("--temperature", self.temperature, {"at_least": 0}),
            ("--top-p", self.top_p, {"above": 0, "at_most": 1}),
            ("--top-k", self.top_k, whole),
            ("--seed", self.seed, {"integer": True, "at_least": INT64_MIN, "at_most": INT64_MAX}),
            ("--max-new-tokens", self.max_new_tokens, whole),
            ("--prefill-chunk", self.prefill_chunk, whole),
        )
        if self.memory_budget is not None:
            from longva_cli.engine.plan import parse_size

            parse_size(self.memory_budget)

    def memory_plan(self, media: Path | None, only_planning: bool = False):
        """The run's memory plan (engine/plan.py), from the checkpoint's config files alone."""
        from longva_cli.engine.plan import plan_for

        return plan_for(
            self.model, media, frames=self.frames, fps=self.fps, max_new_tokens=self.max_new_tokens, prefill_chunk=self.prefill_chunk,
            device=self.device, dtype=self.dtype, quantize=self.quantize, kv_cache=self.kv_cache, budget=self.memory_budget,
            revision=self.revision, only_planning=only_planning,
        )

    def open(self, media: Path | None, keep_history: bool):
        """Load the model; a `Session` about `media` and the sampling settings of its answers."""
        from longva_cli.engine.encoder import MediaSpec
        from longva_cli.engine.objectives import SamplingSettings
        from longva_cli.engine.plan import fit_budget
        from longva_cli.engine.session import Session
        from longva_cli.engine.visual_cache import disk_cache
        from longva_cli.model.prompt import DEFAULT_SYSTEM

        cache = disk_cache(self.cache_dir, self.use_cache)  # a bad $LONGVA_CACHE_MAX_GB fails before the model loads
        fitted = fit_budget(
            lambda: self.memory_plan(media), say_plan, quantize=self.quantize, kv_cache=self.kv_cache, device_map=self.device_map
        )
        longva = load_model(
            self.model, device=self.device, dtype=self.dtype, attn=self.attn, device_map=self.device_map,
            quantize=fitted.quantize, quantize_backend=self.quantize_backend, revision=self.revision, kv_cache=fitted.kv_cache,
        )
        session = Session(
            longva, [MediaSpec(media, self.frames, self.fps)] if media is not None else [],
            system=DEFAULT_SYSTEM if self.system is None else self.system, cache=cache,
            prefill_chunk=self.prefill_chunk, keep_history=keep_history, visual_tokens_on_host=fitted.visual_tokens_on_host,
        )
        sampling = SamplingSettings.defaults(longva.generation_config, max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        sampling.seed = self.seed
        return session, sampling


def checked_settings(
    media: Path | None, media_sampling: options.MediaSampling, sampling: options.Sampling, loading: options.Loading,
    cache: options.EmbeddingCache, **flags,
) -> AskSettings:
    """The commands' flags as settings, checked with the media file: bad input fails before any model loads."""
    from longva_cli.engine.encoder import media_kind

    settings = AskSettings(
        **vars(media_sampling), **vars(sampling), **vars(loading), cache_dir=cache.cache_dir, use_cache=not cache.no_cache, **flags
    )
    settings.check()
    if media is not None:
        media_kind(media)
    return settings


def ask(media: Path | None, questions: list[str], settings: AskSettings = AskSettings(), *, stream: bool = True, on_answer=None):
    """Load the model and answer each question about `media` (encoded and prefilled once).

    With `stream`, answers are written to stdout as they are generated (several questions are
    shown as "Q: ..." / "A: ..." blocks); `on_answer(answer)` gets each finished `Answer`.
    """
    from longva_cli.engine.objectives import drive

    session, sampling = settings.open(media, keep_history=False)
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


@options.composed
def command(
    media: Path = typer.Argument(..., help="A video or image file (recognised by content)."),
    question: Optional[List[str]] = typer.Argument(None, help="One or more questions; '-' reads one from standard input."),
    questions_file: Optional[str] = typer.Option(None, "--questions", help="A file with one question a line ('-': standard input)."),
    *,
    media_sampling: options.MediaSampling,
    model: options.Model = AskSettings.model,
    sampling: options.Sampling,
    loading: options.Loading,
    memory_budget: options.MemoryBudget = None,
    plan: bool = typer.Option(False, "--plan", help="Print the memory plan (config files only, no weights) and exit."),
    revision: options.Revision = None,
    prefill_chunk: options.PrefillChunk = AskSettings.prefill_chunk,
    cache: options.EmbeddingCache,
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
      longva ask movie.mp4 q --frames 3000 --device cuda --memory-budget 24GiB --plan
    """
    questions = read_questions(question or [], questions_file)
    settings = checked_settings(
        media, media_sampling, sampling, loading, cache, model=model, memory_budget=memory_budget, revision=revision,
        prefill_chunk=prefill_chunk,
    )
    if plan:
        from rich.console import Console

        from longva_cli.engine.plan import plan_table

        Console().print(plan_table(settings.memory_plan(media, only_planning=True)))
        return
    ask(media, questions, settings, stream=not json_output, on_answer=(lambda answer: typer.echo(answer.to_json())) if json_output else None)
