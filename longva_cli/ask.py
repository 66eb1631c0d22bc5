"""`longva ask`: answer a question about a video or an image, streaming the answer to stdout."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from longva_cli import options
from longva_cli.console import progress, stderr
from longva_cli.errors import LongVAError
from longva_cli.hub import DEFAULT_MODEL


def check_media(path: Path) -> str:
    """'image' or 'video' by the file's content; raises before any model is loaded."""
    from longva_cli.model import media

    media.check_file(path)
    if media.open_image(path) is not None:
        return "image"
    media.open_video(path)
    return "video"


def load(model: str, *, attn: str = "auto", **options):
    """`LongVA.from_pretrained` with a spinner and a one-line report on stderr (for CLI commands)."""
    from longva_cli.model.longva import LongVA

    with stderr.status(f"Loading {model}"):
        longva = LongVA.from_pretrained(model, attn_implementation=attn, **options)
    stderr.print(f"Loaded {model} in {longva.load_seconds:.1f}s on {longva.model.device} ({longva.model.dtype}).")
    return longva


def ask(
    media: Path | None,
    question: str,
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
    stream: bool = True,
):
    """Load `model`, answer `question` about `media`; stream text to stdout when `stream`.

    `frames` frames are sampled uniformly (32 when None); with `fps`, `frames` caps the count.
    """
    from longva_cli.model.prompt import DEFAULT_SYSTEM

    longva = load(model, device=device, dtype=dtype, attn=attn, device_map=device_map, quantize=quantize, revision=revision)

    bar = progress(unit="frames", transient=True)
    task = None

    def on_start(count: int) -> None:
        nonlocal task
        bar.start()
        task = bar.add_task("Encoding frames", total=count)

    def on_progress(done: int) -> None:
        bar.advance(task, done)
        if bar.finished:
            bar.stop()

    def on_text(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        answer = longva.ask(
            media,
            question,
            frames=frames,
            fps=fps,
            system=DEFAULT_SYSTEM if system is None else system,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            prefill_chunk=prefill_chunk,
            on_text=on_text if stream else None,
            on_warning=lambda message: stderr.print(f"[yellow]warning:[/yellow] {message}"),
            on_start=on_start,
            on_progress=on_progress,
        )
    finally:
        bar.stop()
    if stream:
        sys.stdout.write("\n")
    return answer


def command(
    media: Path = typer.Argument(..., help="A video or image file (recognised by content)."),
    question: str = typer.Argument(..., help="The question; '-' reads it from standard input."),
    frames: int = typer.Option(None, "--frames", "-n", help="Frames sampled uniformly from the video, 144 tokens each (default 32)."),
    fps: float = typer.Option(None, "--fps", help="Sample this many frames per second instead (--frames then caps the count)."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Checkpoint folder, hub id or short name."),
    max_new_tokens: int = typer.Option(1024, "--max-new-tokens", help="Most tokens to generate."),
    temperature: float = typer.Option(0.5, "--temperature", "-t", help="Sampling temperature; 0 = greedy (the original demo used 0.5)."),
    top_p: float = typer.Option(None, "--top-p", help="Nucleus sampling threshold (off by default, as in the original)."),
    top_k: int = typer.Option(None, "--top-k", help="Top-k sampling (default: the checkpoint's generation config, else 50)."),
    seed: int = typer.Option(0, "--seed", help="Random seed for sampling."),
    system: str = typer.Option(None, "--system", help="System prompt (default: 'You are a helpful assistant.'; '' for none)."),
    device: options.Device = "auto",
    dtype: options.Dtype = "auto",
    attn: options.Attention = "auto",
    device_map: options.DeviceMap = None,
    quantize: options.Quantize = None,
    revision: options.Revision = None,
    prefill_chunk: options.PrefillChunk = 4096,
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object (answer, counts, timings) and nothing else on stdout."),
) -> None:
    """Answer a question about a video or an image.

    The answer streams to stdout; loading, progress and timing go to stderr.

    examples:
      longva ask movie.mp4 "What happens after the car stops?" --frames 128
      longva ask photo.jpg "Describe the image in detail." --temperature 0
      echo "What colour is the car?" | longva ask clip.mp4 - --json | jq .answer
    """
    if question == "-":
        question = sys.stdin.read().strip()
    if not question.strip():
        raise LongVAError("the question is empty; pass it as the second argument or through stdin with '-'.")
    if frames is not None and frames < 1:
        raise LongVAError(f"--frames must be at least 1, got {frames}.")
    if fps is not None and fps <= 0:
        raise LongVAError(f"--fps must be positive, got {fps}.")
    if temperature < 0:
        raise LongVAError(f"--temperature must be 0 (greedy) or positive, got {temperature}.")
    if top_p is not None and not 0 < top_p <= 1:
        raise LongVAError(f"--top-p must be in (0, 1], got {top_p}.")
    if max_new_tokens < 1:
        raise LongVAError(f"--max-new-tokens must be at least 1, got {max_new_tokens}.")
    if prefill_chunk < 1:
        raise LongVAError(f"--prefill-chunk must be at least 1, got {prefill_chunk}.")
    check_media(media)
    answer = ask(
        media,
        question,
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
        stream=not json_output,
    )
    if json_output:
        typer.echo(answer.to_json())
    t = answer.timings
    stderr.print(
        f"[dim]{answer.media_type or 'text'}: {answer.frames} {'frames' if answer.media_type == 'video' else 'crops'}, "
        f"{answer.visual_tokens:,} visual + {answer.prompt_tokens - answer.visual_tokens:,} text tokens; "
        f"encode {t.get('encode_s', 0):.1f}s, prefill {t.get('prefill_s', 0):.1f}s, "
        f"{answer.generated_tokens} tokens in {t.get('generate_s', 0):.1f}s[/dim]"
    )
