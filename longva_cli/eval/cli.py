"""`longva eval`: the Typer sub-app. `longva eval --tasks ...` runs lmms-eval in this process;
`longva eval local ...` scores multiple-choice video QA from a folder, without the hub."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Annotated

import typer

from longva_cli import defaults, options
from longva_cli.console import on_interrupt, progress, stderr, stdout, this_command
from longva_cli.errors import LongVAError
from longva_cli.eval.local import DEFAULT_EVAL_MODEL
from longva_cli.eval.settings import PplSettings

INSTALL_HINT = (
    "lmms-eval is not installed; run `pip install 'longva[eval]'` and then, on a machine without a GPU, "
    "`pip uninstall -y torchvision` (lmms-eval pulls a torchvision that does not import next to the CPU torch), "
    "or use `longva eval local` which needs neither."
)

# `eval` (lmms-eval) and `eval local` sample every video alike.
Frames = Annotated[int, typer.Option("--frames", "-n", help="Frames sampled uniformly from each video (144 tokens each).")]

app = typer.Typer(
    no_args_is_help=True,
    invoke_without_command=True,
)


@app.callback()
def lmms_command(
    ctx: typer.Context,
    tasks: str = typer.Option(None, "--tasks", help="Comma-separated lmms-eval task names, e.g. videomme,mme."),
    model: options.Model = DEFAULT_EVAL_MODEL,
    frames: Frames = defaults.FRAMES,
    output: Path = typer.Option(Path("runs/eval"), "--output", "-o", help="Folder for results.json and per-task samples."),
    limit: int = typer.Option(None, "--limit", help="Only the first N documents of each task (for a quick check)."),
    device: options.Device = "auto",
    dtype: options.Dtype = "auto",
    attn: options.Attention = "auto",
    conv_template: str = typer.Option("qwen_1_5", "--conv-template", help="Chat template; LongVA was trained with qwen_1_5."),
    revision: options.Revision = None,
    include_path: Path = typer.Option(None, "--include-path", help="A folder of your own lmms-eval task YAML files."),
    stop_on_degenerate: bool = typer.Option(
        True, "--stop-on-degenerate/--no-stop-on-degenerate", help="Stop when too many answers are empty or '!!!!' (else warn)."
    ),
    json_output: options.Json = False,
) -> None:
    """Benchmark LongVA through lmms-eval, or on local multiple-choice video QA.

    With --tasks, lmms-eval runs the named tasks in this process with LongVA as the model
    (qwen_1_5 template, bfloat16 on GPUs, a guard against degenerate answers); results.json
    records the scores with the versions, model revision, frames and dtype. Needs the `eval`
    extra. The same model is `--model longva_cli` in lmms-eval's own command line.

    `longva eval local --help` describes the offline evaluator (Video-MME layout or JSONL).

    examples:
      longva eval --tasks videomme,mme --model lmms-lab/LongVA-7B --frames 32 --output runs/eval
      longva eval --tasks videomme --limit 20 --no-stop-on-degenerate
      lmms-eval --model longva_cli --model_args pretrained=lmms-lab/LongVA-7B,max_frames_num=32 --tasks videomme
      longva eval local --data ~/datasets/Video-MME --model lmms-lab/LongVA-7B --frames 64
    """
    if ctx.invoked_subcommand is not None:
        return
    if not tasks:
        raise LongVAError("give --tasks (lmms-eval task names) or use `longva eval local --data FOLDER`; see `longva eval --help`.")
    if frames < 1:
        raise LongVAError(f"--frames must be at least 1, got {frames}.")
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    run_lmms_eval = import_lmms_runner()
    results = run_lmms_eval(
        names, model=model, frames=frames, output=output, limit=limit, device=device, dtype=dtype, attn=attn,
        conv_template=conv_template, revision=revision, stop_on_degenerate=stop_on_degenerate, include_path=include_path,
    )
    if results is not None:
        if json_output:
            typer.echo(json.dumps(results["results"], default=str))
        else:
            print_task_table(results)
        stderr.print(f"results: {output / 'results.json'}")


def print_task_table(results: dict) -> None:
    from rich.table import Table

    table = Table("task", "metric", "value", title="lmms-eval results")
    for task, metrics in results["results"].items():
        for metric, value in metrics.items():
            if metric == "alias" or "stderr" in metric:
                continue
            shown = f"{value:.2f}" if isinstance(value, float) else str(value)
            table.add_row(task, metric.split(",")[0], shown)
    stdout.print(table)


@app.command("local", no_args_is_help=True)
def local_command(
    data: Path = typer.Option(..., "--data", "-d", help="Video-MME folder (annotations + data/ videos) or a JSONL file."),
    model: options.Model = DEFAULT_EVAL_MODEL,
    frames: Frames = defaults.FRAMES,
    output: Path = typer.Option(None, "--output", "-o", help="Run folder (default runs/eval-local/<data>-<frames>f); rerun to resume."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete the results in --output (made with other settings) and start over."),
    annotations: Path = typer.Option(None, "--annotations", "-a", help="Annotation file (parquet, JSON or JSONL) when not found in --data."),
    prompt: str = typer.Option("videomme", "--prompt", help="videomme (Video-MME's own prompt) or lmms-eval (the harness's wording)."),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", help="Most tokens per answer (Video-MME uses 16)."),
    limit: int = typer.Option(None, "--limit", help="Only the first N questions."),
    device: options.Device = "auto",
    dtype: options.Dtype = "auto",
    attn: options.Attention = "auto",
    kv_cache: options.KVCache = "auto",
    memory_budget: options.MemoryBudget = None,
    revision: options.Revision = None,
    prefill_chunk: options.PrefillChunk = defaults.PREFILL_CHUNK,
    cache_dir: options.CacheDir = None,
    no_cache: options.NoCache = False,
    stop_on_degenerate: bool = typer.Option(
        True, "--stop-on-degenerate/--no-stop-on-degenerate", help="Stop when too many answers are empty, '!!!!' or unparseable (else warn)."
    ),
    degenerate_threshold: float = typer.Option(0.3, "--degenerate-threshold", help="Share of broken answers that trips the guard."),
    degenerate_min_samples: int = typer.Option(10, "--degenerate-min-samples", help="Answers seen before the guard may trip."),
    json_output: options.Json = False,
) -> None:
    """Score multiple-choice video QA from local files: no hub, no lmms-eval.

    Reads the Video-MME layout (an annotation parquet or JSON at the root or in videomme/,
    videos in data/{videoID}.mp4 or .mkv) or a JSONL file with one question a line:
    {"video": "clips/a.mp4", "question": "...", "options": ["...", "..."], "answer": "B"}
    (optional "id", "category", "duration"; paths relative to the file). Answers are greedy
    with Video-MME's prompt; each video is encoded once for all its questions. Every answer
    is appended to samples.jsonl at once, so running the same command again continues where
    it stopped. Prints accuracy overall, by duration and by category, and writes results.json.

    examples:
      longva eval local --data ~/datasets/Video-MME --model lmms-lab/LongVA-7B --frames 64
      longva eval local --data my-questions.jsonl --frames 32 --output runs/mine
      longva eval local --data ~/datasets/Video-MME --limit 30 --dtype float16 --no-stop-on-degenerate
    """
    from longva_cli.display import say_plan
    from longva_cli.engine.runs import read_lines
    from longva_cli.engine.visual_cache import disk_cache
    from longva_cli.eval.local import SAMPLES_FILE, evaluate_local, run_folder

    def kept() -> str:
        answers = run_folder(data, frames, output) / SAMPLES_FILE
        done = len(read_lines(answers))
        if not done:
            return "no question was answered yet; run the same command again to start."
        return f"{done} answers are saved in {answers}; run the same command to continue: {this_command(drop=('--overwrite',))}"

    with on_interrupt(kept):
        results = evaluate_local(
            data, model=model, frames=frames, output=output, annotations=annotations, prompt=prompt,
            max_new_tokens=max_new_tokens, limit=limit, device=device, dtype=dtype, attn=attn, revision=revision,
            prefill_chunk=prefill_chunk, cache=disk_cache(cache_dir, not no_cache), overwrite=overwrite,
            stop_on_degenerate=stop_on_degenerate, degenerate_threshold=degenerate_threshold,
            degenerate_min_samples=degenerate_min_samples, kv_cache=kv_cache, memory_budget=memory_budget,
            on_warning=lambda message: stderr.print(f"[bold red]warning:[/bold red] {message}"), on_plan=say_plan,
            progress=progress(unit="questions"),
        )
    if json_output:
        typer.echo(json.dumps({"summary": results["summary"], "skipped": results["skipped"], "samples_file": results["samples_file"]}, default=str))
    else:
        print_local_table(results)
    folder = Path(results["samples_file"]).parent
    stderr.print(f"results: {folder / 'results.json'}; answers: {results['samples_file']}")


def print_local_table(results: dict) -> None:
    """Accuracy by group on stdout; skipped questions on stderr."""
    from rich.table import Table

    summary = results["summary"]
    table = Table("group", "correct", "total", "accuracy %", title="local multiple-choice accuracy")

    def row(name: str, score: dict) -> None:
        shown = "-" if score["accuracy"] is None else f"{score['accuracy']:.1f}"
        table.add_row(name, str(score["correct"]), str(score["total"]), shown)

    row("overall", summary["overall"])
    for field in ("duration", "category", "domain"):
        for name, score in summary.get(field, {}).items():
            row(f"{field}: {name}", score)
    stdout.print(table)
    if results["skipped"]:
        stderr.print(f"[yellow]{len(results['skipped'])} question(s) skipped:[/yellow]")
        for item in results["skipped"][:10]:
            stderr.print(f"  {item['id']}: {item['reason']}")
        if len(results["skipped"]) > 10:
            stderr.print(f"  ... and {len(results['skipped']) - 10} more (see results.json)")


def import_lmms_runner():
    """`run_lmms_eval`, or one sentence on how to install lmms-eval when it is missing or broken."""
    if importlib.util.find_spec("lmms_eval") is None:
        raise LongVAError(INSTALL_HINT)
    try:
        from longva_cli.eval.lmms import run_lmms_eval
    except (ImportError, RuntimeError, AttributeError) as err:  # a torchvision built for another torch fails here
        raise LongVAError(f"lmms-eval is installed but does not import ({type(err).__name__}: {str(err).splitlines()[0]}); {INSTALL_HINT.split('; ', 1)[1]}") from None
    return run_lmms_eval


# ---- `longva eval ppl` and `longva eval ppl plot RUN` ---------------------------------------------

ppl_app = typer.Typer(no_args_is_help=True, invoke_without_command=True)
app.add_typer(ppl_app, name="ppl")


@ppl_app.callback()
def ppl_command(
    ctx: typer.Context,
    model: list[str] = typer.Option(None, "--model", "-m", help="Causal LM folder or hub id, or a LongVA checkpoint (its language model); repeat for several."),
    data: str = typer.Option(None, "--data", "-d", help="A .txt/.jsonl/.parquet file or folder of them (.txt: one document a file), a saved `datasets` folder, or a hub dataset name."),
    output: Path = typer.Option(None, "--output", "-o", help="Run folder for ppl.csv, ppl.jsonl and ppl.png (default: runs/ppl-<data name>); rerun to continue."),
    min_tokens: int = typer.Option(PplSettings.min_tokens, "--min-tokens", help="Smallest context length L."),
    max_tokens: int = typer.Option(PplSettings.max_tokens, "--max-tokens", help="Largest context length L."),
    token_step: int = typer.Option(None, "--token-step", help="Step between context lengths (default: double from --min-tokens)."),
    stride: int = typer.Option(None, "--stride", help="Tokens between window starts; each window scores only tokens no earlier one did (default: L, disjoint windows)."),
    text_field: str = typer.Option(PplSettings.text_field, "--text-field", help="Field (.jsonl) or column (.parquet, datasets) holding the text."),
    split: str = typer.Option(PplSettings.split, "--split", help="Split of a `datasets` name or saved DatasetDict."),
    samples: int = typer.Option(None, "--samples", help="Score only the first N documents (after --min-doc-tokens)."),
    min_doc_tokens: int = typer.Option(PplSettings.min_doc_tokens, "--min-doc-tokens", help="Drop documents shorter than this many tokens."),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="Where tokenized documents are cached (default: ~/.cache/longva/ppl)."),
    device: options.Device = "auto",
    device_map: options.DeviceMap = None,
    sequence_parallel: int = typer.Option(PplSettings.sequence_parallel, "--sequence-parallel", help="Split each window over this many torchrun ranks (DeepSpeed Ulysses)."),
    dtype: options.Dtype = "auto",
    attn: options.Attention = "auto",
    kv_cache: options.KVCache = "auto",
    prefill_chunk: options.PrefillChunk = PplSettings.prefill_chunk,
    revision: options.Revision = None,
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete the results in --output (made with other data, stride or selection) and start over."),
    json_output: options.Json = False,
) -> None:
    """Perplexity on long documents against context length, for any causal LM.

    At each context length L (doubling from --min-tokens to --max-tokens, or every
    --token-step), each document is scored in windows of L tokens, advanced by --stride;
    tokens scored by an earlier window do not count again. Perplexity is exp of the mean NLL
    over all scored tokens; the original's average of per-window means is in ppl.jsonl too.
    Documents are tokenized once and cached. Each finished (model, L) is saved at once:
    rerun the same command to continue, or add models and lengths to the same folder.
    Prints the table on stdout (--json: the records of ppl.jsonl); writes ppl.csv, ppl.jsonl, ppl.png.

    examples:
      longva eval ppl --model runs/extend-qwen2-7b-224k/step_1000 --model Qwen/Qwen2-7B-Instruct --data pg19/ --min-tokens 4096 --max-tokens 262144 --output runs/ppl
      longva eval ppl --model lmms-lab/Qwen2-7B-Instrcuct-224K --data emozilla/pg19-test --token-step 32000 --max-tokens 512000
      longva eval ppl --model lmms-lab/LongVA-7B --data books.jsonl --text-field content --samples 10 --stride 2048
      torchrun --nproc-per-node 4 -m longva_cli eval ppl --model lmms-lab/Qwen2-7B-Instrcuct-224K --data pg19/ --max-tokens 524288 --sequence-parallel 4
      longva eval ppl plot runs/ppl
    """
    if ctx.invoked_subcommand is not None:
        return
    from longva_cli.console import progress as progress_bar
    from longva_cli.engine.runs import read_lines
    from longva_cli.eval.ppl import RESULTS, evaluate_perplexity, run_folder

    if not data:
        raise LongVAError("give --data (text files, a saved `datasets` folder or a hub dataset name); see `longva eval ppl --help`.")
    settings = PplSettings(
        models=list(model or []), data=data, output=output, min_tokens=min_tokens, max_tokens=max_tokens, token_step=token_step,
        stride=stride, text_field=text_field, split=split, samples=samples, min_doc_tokens=min_doc_tokens, cache_dir=cache_dir,
        device=device, dtype=dtype, attn=attn, device_map=device_map, sequence_parallel=sequence_parallel, prefill_chunk=prefill_chunk,
        revision=revision, kv_cache=kv_cache,
    )
    def kept() -> str:
        records = run_folder(settings) / RESULTS
        done = len(read_lines(records))
        if not done:
            return "no (model, length) was measured yet; run the same command again to start."
        return f"{done} (model, length) results are saved in {records}; run the same command to continue: {this_command(drop=('--overwrite',))}"

    bar = progress_bar(unit="tok")
    with on_interrupt(kept), bar:
        run = evaluate_perplexity(
            settings, overwrite=overwrite, progress=bar, on_warning=lambda message: bar.console.print(f"[bold red]warning:[/bold red] {message}"),
        )
    if run is None:  # not the main rank
        return
    if json_output:
        typer.echo(json.dumps({"records": run.records, "folder": str(run.folder)}, default=str))
    else:
        print_ppl_table(run.records)
    if run.plot_note:
        stderr.print(f"[yellow]note:[/yellow] {run.plot_note}")
    stderr.print(f"results: {run.folder} (ppl.csv, ppl.jsonl{'' if run.plot_note else ', ppl.png'}); measured now: {len(run.scored_now)}")


def print_ppl_table(records: list[dict]) -> None:
    """Token-weighted perplexity per model and length, and the original's window mean under it."""
    from rich.table import Table

    from longva_cli.eval.ppl import curves
    from longva_cli.eval.ppl_plot import length_label

    lengths, weighted = curves(records)
    _, window_means = curves(records, "window_mean_perplexity")
    table = Table("model", *[length_label(length) for length in lengths], title="perplexity against context length",
                  caption="second row: mean of per-window perplexity means, as the original averaged")
    for model, values in weighted.items():
        table.add_row(model, *["-" if value is None else f"{value:.3f}" for value in values])
        table.add_row("", *["" if value is None else f"[dim]{value:.3f}[/dim]" for value in window_means[model]])
    stdout.print(table)


@ppl_app.command("plot", no_args_is_help=True)
def ppl_plot_command(
    run: Path = typer.Argument(..., help="A run folder of `longva eval ppl` or a ppl.csv (the original's layout)."),
    output: Path = typer.Option(None, "--output", "-o", help="Where to write the PNG (default: ppl.png beside the table)."),
    title: str = typer.Option(None, "--title", help="A title above the plot."),
) -> None:
    """Redraw the perplexity curve from a run's ppl.csv (or any CSV in the original's layout).

    examples:
      longva eval ppl plot runs/ppl
      longva eval ppl plot runs/ppl/ppl.csv --output qwen2-224k.png --title "Qwen2-7B-224K on PG-19"
    """
    from longva_cli.eval.ppl import PLOT, TABLE, read_table
    from longva_cli.eval.ppl_plot import draw_curves

    table = run if run.is_file() else run / TABLE
    if not table.is_file():
        raise LongVAError(f"{table} does not exist; give a run folder of `longva eval ppl` or its ppl.csv.")
    typer.echo(str(draw_curves(*read_table(table), output or table.parent / PLOT, title)))
