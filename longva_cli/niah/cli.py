"""`longva niah video|text|plot`: the Typer layer over `video.run_video`, `text.run_text` and `heatmap`.

Every option defaults to None so that a flag given on the command line can be told apart
from a default: defaults < recipe (`--recipe`) < stored settings (`--resume RUN`) < flags.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from longva_cli import options
from longva_cli.console import on_interrupt, stderr, stdout
from longva_cli.errors import LongVAError
from longva_cli.niah.settings import TextSettings, VideoSettings

app = typer.Typer(
    help="""Needle-in-a-haystack tests: V-NIAH on any long video, text NIAH on any text, and their heatmaps.

    Each run keeps every finished cell in its --output folder; run the same command again, or
    `--resume RUN`, to continue a stopped one. The scores go to stdout (a table, or --json).

    examples:
      longva niah video --haystack movie.mp4 --model lmms-lab/LongVA-7B --output runs/niah-longva
      longva niah video --resume runs/niah-longva
      longva niah text --model lmms-lab/Qwen2-7B-Instrcuct-224K --haystack essays/ --max-tokens 128000
      longva niah plot runs/niah-longva
    """,
    no_args_is_help=True,
)


# The options of each mode default to None (see above); their help shows the settings' defaults.
def optional(*names: str, help: str, kind=str) -> object:
    """A `kind` option that defaults to None: the recipe's, the run's or the settings' value holds then."""
    return Annotated[Optional[kind], typer.Option(*names, help=help)]


# Options of both modes whose defaults differ between them.
def output_option(settings: type) -> object:
    return optional("--output", "-o", kind=Path, help=f"Run folder [default: {settings.output}]; rerun the same command to continue.")


def depth_step_option(settings: type) -> object:
    return optional("--depth-step", kind=float, help=f"Step between needle depths from 0 to 1 [default: {settings.depth_step}].")


@dataclass
class VideoGrid:
    """`niah video`'s own options: the haystack, the needles and the grid of cells."""

    haystack: optional("--haystack", kind=Path, help="A long video you have (a film, a lecture); sampled at 1 frame a second.") = None
    model: optional("--model", "-m", help=f"LongVA checkpoint folder, hub id or short name [default: {VideoSettings.model}].") = None
    needles: optional(
        "--needles", help=f"v_niah_needles (the hub set) or a folder of images + needles.jsonl {{image, question, answer}} [default: {VideoSettings.needles}]."
    ) = None
    output: output_option(VideoSettings) = None
    min_frames: optional("--min-frames", kind=int, help=f"Smallest haystack, in frames [default: {VideoSettings.min_frames}].") = None
    max_frames: optional("--max-frames", kind=int, help=f"Largest haystack, in frames [default: {VideoSettings.max_frames}].") = None
    frame_step: optional("--frame-step", kind=int, help=f"Step between haystack sizes [default: {VideoSettings.frame_step}].") = None
    depth_step: depth_step_option(VideoSettings) = None
    memory_budget: options.MemoryBudget = None


@dataclass
class TextGrid:
    """`niah text`'s own options: the model, the haystack, the needles and the grid of cells."""

    model: optional("--model", "-m", help=f"Causal LM folder or hub id [default: {TextSettings.model}].") = None
    haystack: optional("--haystack", help=f"A folder of .txt files (repeated past the longest context), or {TextSettings.haystack} [default].") = None
    output: output_option(TextSettings) = None
    min_tokens: optional("--min-tokens", kind=int, help=f"Shortest haystack in tokens [default: {TextSettings.min_tokens}].") = None
    max_tokens: optional("--max-tokens", kind=int, help=f"Longest haystack in tokens [default: {TextSettings.max_tokens}].") = None
    token_step: optional("--token-step", kind=int, help=f"Step between haystack lengths [default: {TextSettings.token_step}].") = None
    depth_step: depth_step_option(TextSettings) = None
    samples: optional("--samples", kind=int, help=f"Needle numbers per cell [default: {TextSettings.samples}].") = None
    distractors: optional("--distractors", kind=int, help=f"Other cities' numbers hidden too, 0 to 6 [default: {TextSettings.distractors}].") = None
    seed: optional("--seed", kind=int, help=f"Seed of the numbers and distractor places [default: {TextSettings.seed}].") = None


@dataclass
class Scoring:
    """How both modes score a cell. This group and `Running` show VideoSettings' defaults:
    TextSettings spells them alike."""

    scoring: optional(
        "--scoring", help="teacher-forced (the original: argmax equals the answer at every answer token) or generate (greedy answer, "
        f"compared as text) [default: {VideoSettings.scoring}].",
    ) = None
    max_new_tokens: optional("--max-new-tokens", kind=int, help=f"Longest generated answer (generate scoring) [default: {VideoSettings.max_new_tokens}].") = None


@dataclass
class Running:
    """Where and how the cells are computed."""

    device: options.default_shown(options.Device, VideoSettings.device) = None
    device_map: options.DeviceMap = None
    sequence_parallel: optional(
        "--sequence-parallel", kind=int,
        help=f"Split each sequence over this many torchrun ranks (DeepSpeed Ulysses; teacher-forced) [default: {VideoSettings.sequence_parallel}].",
    ) = None
    dtype: options.default_shown(options.Dtype, VideoSettings.dtype) = None
    attn: options.default_shown(options.Attention, VideoSettings.attn) = None
    kv_cache: options.default_shown(options.KVCache, VideoSettings.kv_cache) = None
    prefill_chunk: options.default_shown(options.PrefillChunk, VideoSettings.prefill_chunk) = None


@dataclass
class RunFolder:
    """Which settings a run starts from, and what happens to the results already in its folder."""

    recipe: optional("--recipe", "-r", help="Settings from a recipe: a YAML file or a bundled name (`longva recipes list`); flags override it.") = None
    resume: Annotated[
        Optional[str],
        typer.Option(
            "--resume", metavar="RUN", help="Continue the run in this folder with the settings stored there (flags may change --device, "
            "--attn, --prefill-chunk and --cache-dir); rerunning the same command continues it too.",
        ),
    ] = None
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete the results in --output and start over.")] = False


def settings_for(mode: str, recipe: str | None, resume: str | None, flags: dict):
    """The run's settings: defaults, then the recipe, then (--resume RUN) the folder's, then flags.

    `resume` "" stands for the --output folder (the bare `--resume` switch of the last release).
    """
    from longva_cli.niah.results import stored_settings
    from longva_cli.niah.settings import NiahRecipe, check
    from longva_cli.recipes import build, load_recipe

    schema = VideoSettings if mode == "video" else TextSettings
    base = NiahRecipe()
    if recipe is not None:
        base = load_recipe(NiahRecipe, recipe)
        check(base)
        if base.mode != mode:
            raise LongVAError(f"recipe {recipe} is a {base.mode} recipe; run it with `longva niah {base.mode} --recipe {recipe}`.")
    section = getattr(base, mode)
    given = {key: value for key, value in flags.items() if value is not None}
    if resume is not None:
        folder = Path(resume) if resume else Path(given.get("output") or section.output)
        if "output" in given and Path(given["output"]) != folder:
            raise LongVAError(f"--resume {folder} continues the run in {folder}; drop --output {given['output']} (or give the same folder).")
        stored_mode, stored = stored_settings(folder)
        if stored_mode != mode:
            raise LongVAError(f"{folder} holds a {stored_mode} run; resume it with `longva niah {stored_mode} --resume {folder}`.")
        section = build(schema, stored)
        given["output"] = folder
    settings = replace(section, **given)
    if settings.scoring not in ("teacher-forced", "generate"):
        raise LongVAError(f"--scoring must be teacher-forced or generate, got {settings.scoring!r}.")
    return settings


def run_grid(mode: str, settings, overwrite: bool, json_output: bool) -> None:
    """Run the grid and report it; Ctrl-C says how much is saved and how to continue."""
    from longva_cli.niah.grid import finished_cells
    from longva_cli.niah.results import SETTINGS
    from longva_cli.niah.settings import check_text, video_grid

    def kept() -> str:
        folder = Path(settings.output)
        if not (folder / SETTINGS).is_file():
            return "nothing was scored yet; run the same command again to start."
        sizes, depths = (video_grid if mode == "video" else check_text)(settings)
        done = len(finished_cells(folder, mode))
        return f"{done} of {len(sizes) * len(depths)} cells are saved in {folder}; continue with: longva niah {mode} --resume {folder}"

    if mode == "video":
        from longva_cli.niah.video import run_video as run
    else:
        from longva_cli.niah.text import run_text as run
    with on_interrupt(kept):
        result = run(settings, overwrite=overwrite)
    report(result, json_output)


def report(run, json_output: bool = False) -> None:
    """The scores on stdout (a table, depth down and size across, or --json); notes and where
    the files are on stderr."""
    if run is None:  # not rank 0
        return
    from rich.table import Table

    from longva_cli.niah.results import OUTPUT_KEYS, SIZE_KEYS
    from longva_cli.niah.settings import depth_label, size_label

    size_key = SIZE_KEYS[run.mode]
    written = [name for name in ("all_accuracies.json", "avg_accuracy.txt", "heatmap.png", "results.jsonl") if (run.folder / name).is_file()]
    if json_output:
        cells = [{size_key: cell[size_key], "depth": cell["depth"], "score": cell["score"]} for cell in run.cells]
        typer.echo(json.dumps({"mode": run.mode, "average_accuracy": run.average, "cells": cells, "folder": str(run.folder), "files": written}))
    else:
        sizes = sorted({cell[size_key] for cell in run.cells})
        depths = sorted({cell["depth"] for cell in run.cells})
        scores = {(cell[size_key], cell["depth"]): cell["score"] for cell in run.cells}
        table = Table(OUTPUT_KEYS[run.mode][1], *[size_label(s) for s in sizes], title=f"{run.mode} NIAH scores", caption=f"Average Accuracy: {run.average:.4f}")
        for depth in depths:
            table.add_row(f"{depth_label(depth):g}", *[f"{scores[(s, depth)]:.2f}" if (s, depth) in scores else "-" for s in sizes])
        stdout.print(table)
    if run.warning:
        stderr.print(f"[yellow]note:[/yellow] {escape(run.warning)}")
    stderr.print(f"results: {escape(str(run.folder))} ({', '.join(written)})")


@app.command("video", no_args_is_help=False)
@options.composed
def video_command(
    grid: VideoGrid,
    scoring: Scoring,
    cache_dir: optional("--cache-dir", kind=Path, help="Where haystack embeddings are cached (the visual cache) [default: ~/.cache/longva/visual].") = None,
    *,
    running: Running,
    run: RunFolder,
    json_output: options.Json = False,
) -> None:
    """V-NIAH: can the model find one needle image among N frames of a long video?

    The haystack is your own video at 1 frame a second (144 tokens a frame, embedded once and
    cached); each needle image goes in at frame int(depth * N). Scores, all_accuracies.json,
    avg_accuracy.txt and heatmap.png follow the original benchmark. Each finished cell is
    saved at once: run the same command again to continue after a crash. 3000 frames (432K
    tokens) fit one 80 GB GPU; a longer sequence spreads over several with --device-map auto,
    and under torchrun the cells are spread over the GPUs.

    examples:
      longva download v_niah_needles
      longva niah video --haystack movie.mp4 --model lmms-lab/LongVA-7B --output runs/niah-longva
      longva niah video --haystack movie.mp4 --min-frames 200 --max-frames 3000 --frame-step 200 --depth-step 0.2
      longva niah video --haystack movie.mp4 --needles my_needles/ --scoring generate
      longva niah video --recipe niah/v-niah-longva-7b --haystack movie.mp4
      torchrun --nproc-per-node 8 -m longva_cli niah video --haystack movie.mp4 --output runs/niah-8gpu
      longva niah video --haystack movie.mp4 --max-frames 5000 --device-map auto
      torchrun --nproc-per-node 4 -m longva_cli niah video --haystack movie.mp4 --max-frames 6000 --sequence-parallel 4
    """
    flags = {**vars(grid), **vars(scoring), "cache_dir": cache_dir, **vars(running)}
    run_grid("video", settings_for("video", run.recipe, run.resume, flags), run.overwrite, json_output)


@app.command("text")
@options.composed
def text_command(grid: TextGrid, scoring: Scoring, running: Running, run: RunFolder, json_output: options.Json = False) -> None:
    """Text NIAH: find "The special magic Singapore number is: NNNNNNN." in a long book.

    The original LongVA text test (prompt, needle, distractors, teacher-forced scoring) on any
    causal LM and any text; the needle goes after a sentence end found from the tokens' text,
    so it works with Qwen2's tokenizer (the original's Llama period ids never matched it).

    examples:
      longva niah text --model lmms-lab/Qwen2-7B-Instrcuct-224K --haystack essays/ --max-tokens 512000 --distractors 3
      longva niah text --model Qwen/Qwen2-7B-Instruct --max-tokens 128000 --token-step 16000 --output runs/niah-qwen2
      longva niah text --recipe niah/text-qwen2-224k --haystack essays/
    """
    flags = {**vars(grid), **vars(scoring), **vars(running)}
    run_grid("text", settings_for("text", run.recipe, run.resume, flags), run.overwrite, json_output)


@app.command("plot", no_args_is_help=True)
def plot_command(
    folder: Path = typer.Argument(..., help="A run folder (with all_accuracies.json) or the all_accuracies.json file."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Where to write the PNG [default: heatmap.png beside the scores]."),
    title: str | None = typer.Option(None, "--title", help="A title above the heatmap."),
) -> None:
    """Redraw the heatmap from saved scores (the original's format: any all_accuracies.json).

    examples:
      longva niah plot runs/niah-longva
      longva niah plot runs/niah-text/all_accuracies.json --output text-niah.png --title "Qwen2-7B-224K"
    """
    from longva_cli.niah.heatmap import draw_heatmap
    from longva_cli.niah.results import ACCURACIES, HEATMAP

    scores = folder if folder.is_file() else folder / ACCURACIES
    if not scores.is_file():
        raise LongVAError(f"{scores} does not exist; give a run folder of `longva niah video|text` or an all_accuracies.json file.")
    try:
        rows = json.loads(scores.read_text())
    except json.JSONDecodeError:
        raise LongVAError(f"{scores} is not valid JSON; rerun the NIAH command to write it again.") from None
    if not rows or not isinstance(rows, list) or "Score" not in rows[0]:
        raise LongVAError(f"{scores} holds no scores; expected a list of {{size, depth, Score}} rows.")
    typer.echo(str(draw_heatmap(rows, output or scores.parent / HEATMAP, title)))
