"""The training loop `extend-text` and `align` share.

A command builds its model, data and DeepSpeed engine, then hands `run` a `Task`: its micro
batches, its loss, and what it counts. The loop does the rest, identically for both: gradient
accumulation, the loss averaged over ranks, one metrics record per step, progress on stderr,
checkpoints every `save_every` steps and at the end, resuming (engine, RNG, data position and
metrics), and the summary.

`processes()` is the start and end of every training run: DeepSpeed's output routed off
stdout, the process group joined, and left again (gloo runs sometimes abort at exit otherwise). `prepare_output()` runs before either: a folder that holds an earlier run
is only continued (`--resume`) or replaced (`--overwrite`) when asked.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from longva_cli.errors import LongVAError
from longva_cli.train.metrics import METRICS, METRICS_FIELDS, MetricsLog

if TYPE_CHECKING:
    import torch

    from longva_cli.parallel.ranks import ParallelState
    from longva_cli.train.settings import LoggingSettings, TrainSettings

# What a training run writes into its output folder (and --overwrite removes): checkpoints and
# their pointer, metrics, loggers' folders, align's skipped-sample list and DPO reference cache.
RUN_FILES = ("latest", ".latest.tmp", METRICS, "skipped.jsonl", "reference_logps.json", "tensorboard", "wandb")


# the command-line options of a run folder, the same in both commands
OUTPUT_HELP = "Run folder for checkpoints and metrics (overrides the recipe's train.output_dir)."
RESUME_HELP = "Continue a run: a checkpoint folder (step_<N>) or a run folder (continues from its `latest`)."
OVERWRITE_HELP = "Delete the earlier run (checkpoints, metrics, logs) in the output folder and start over."


def run_recipe_command(
    train: Callable[..., dict[str, Any]], schema: type, recipe: str, overrides: list[str], output: Path | None,
    resume: Path | None, overwrite: bool,
) -> None:
    """What `longva extend-text` and `longva align` do with their command line: the recipe with
    its overrides (built, then checked by `train`), the training run, and its last checkpoint's
    folder on stdout. Ctrl-C says which checkpoint is kept and the command that continues."""
    from longva_cli.recipes import load_recipe

    # the `deepspeed` launcher appends --local_rank=N; the rank comes from the environment anyway
    settings = load_recipe(schema, recipe, [o for o in overrides if not o.startswith(("--local_rank", "--local-rank"))])
    if output is not None:
        settings.train.output_dir = output.expanduser()
    from longva_cli.console import on_interrupt

    with on_interrupt(lambda: kept_after_stop(settings.train)):
        summary = train(settings, resume=resume, overwrite=overwrite)
    if summary["checkpoint"] and int(os.environ.get("RANK", "0")) == 0:
        print(summary["checkpoint"], flush=True)


def kept_after_stop(train: TrainSettings) -> str:
    """What a stopped run leaves, and the command line that goes on from there."""
    from longva_cli.console import this_command

    folder = Path(train.output_dir)
    steps = checkpoints_in(folder)
    if steps:
        again = this_command(drop=("--overwrite",), drop_with_value=("--resume",), add=("--resume", str(folder)))
        return f"{steps[-1]} is kept (a checkpoint every {train.save_every} steps); continue with: {again}"
    again = this_command(drop_with_value=("--resume",), add=("--overwrite",))
    return f"no checkpoint was written yet (the first at step {train.save_every}); start over with: {again}"


class Task(Protocol):
    """What a training command plugs into the loop."""

    name: str  # progress label
    unit: str  # what the progress bar counts ("tok", "samples")
    per_step: int  # progress units per optimizer step, all ranks together
    tokens: int  # tokens trained on so far, all ranks together (restored on resume)

    def restore(self, client_state: dict[str, Any]) -> None:
        """Take back the counters of a checkpoint's client state."""

    def client_state(self) -> dict[str, Any]:
        """The counters a checkpoint keeps (JSON-safe)."""

    def micro_batches(self, step: int) -> Iterator[Any]:
        """This rank's micro batches from the first micro step of optimizer step `step` on."""

    def loss(self, engine, batch) -> torch.Tensor:
        """The loss of one micro batch (the engine's forward)."""

    def end_step(self, elapsed: float) -> dict[str, Any]:
        """Metrics of the optimizer step just finished, reduced over ranks (called on every rank)."""

    def finish(self, summary: dict[str, Any]) -> None:
        """After the last step, on every rank: files and reports of the command's own."""


# ---------------------------------------------------------------- before and around a run


def checkpoints_in(folder: Path) -> list[Path]:
    """The complete checkpoints (step_<N>) of a run folder, oldest first."""
    steps = [p for p in Path(folder).glob("step_*") if p.is_dir() and p.name.removeprefix("step_").isdigit()]
    return sorted(steps, key=lambda p: int(p.name.removeprefix("step_")))


def prepare_output(folder: Path, resume: str | Path | None, overwrite: bool) -> None:
    """Refuse to train into a folder holding an earlier run unless told to resume or start over.

    Call on every rank before anything is written; with `overwrite` the main rank removes
    what an earlier run wrote (only that: other files in the folder stay).
    """
    folder = Path(folder)
    if resume is not None and overwrite:
        raise LongVAError("--resume continues a run and --overwrite deletes it; give only one of them.")
    if resume is not None:
        return
    steps = checkpoints_in(folder)
    earlier = steps or (folder / "latest").is_file() or (folder / METRICS).is_file()
    if not earlier:
        return
    if not overwrite:
        if steps:
            raise LongVAError(
                f"{folder} already holds a run with checkpoints (up to {steps[-1].name}); continue it with "
                f"--resume {folder}, start over with --overwrite (deletes them), or choose another --output."
            )
        raise LongVAError(
            f"{folder} already holds an earlier run ({METRICS}, no checkpoint); start over with --overwrite "
            "(deletes it) or choose another --output."
        )
    if int(os.environ.get("RANK", "0")) != 0:
        return
    for path in [*steps, *folder.glob(".tmp-step_*"), *folder.glob(".old-step_*"), *(folder / name for name in RUN_FILES)]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


@contextlib.contextmanager
def processes(sp_degree: int = 1, backend: str = "ulysses") -> Iterator[ParallelState]:
    """The distributed world of one training run (a world of one without a launcher)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed's first import
    from longva_cli.parallel import deepspeed_comm, ranks, sequence_attention
    from longva_cli.train import deepspeed_setup

    # stdout carries results: whatever DeepSpeed prints during the run goes to stderr
    with contextlib.redirect_stdout(deepspeed_comm.DeepSpeedChatter(sys.stderr)):
        deepspeed_setup.quiet_libraries()
        state = ranks.init_distributed(sp_degree, backend)
        try:
            yield state
        finally:
            sequence_attention.disable()
            ranks.shutdown(state)  # without destroying the group, gloo runs sometimes abort at exit
            sys.stdout.flush()


# ---------------------------------------------------------------- the loop


def run(
    task: Task,
    engine,
    scheduler,
    state: ParallelState,
    *,
    train: TrainSettings,
    total_steps: int,
    peak_lr: float,
    logging: LoggingSettings,
    recipe: dict[str, Any],
    save_model: Callable[[Path, dict], None],
    needed_bytes: int,
    resume: str | Path | None = None,
) -> dict[str, Any]:
    """Train `task` to `total_steps` optimizer steps; returns the summary (on every rank)."""
    import torch
    import torch.distributed as dist

    from longva_cli.console import progress, stderr
    from longva_cli.train import checkpoint
    from longva_cli.train import deepspeed_setup

    output_dir = Path(train.output_dir)
    step = 0
    if resume is not None:
        client = checkpoint.load(engine, checkpoint.resolve(resume))
        step = int(client.get("step", 0))
        task.restore(client)
        if state.is_main:
            keep_metrics_until(output_dir / METRICS, step)
    log = MetricsLog(output_dir, tensorboard=logging.tensorboard, wandb=logging.wandb,
                     wandb_project=logging.wandb_project, config=recipe, enabled=state.is_main)
    losses: list[float] = []
    start_time, start_step, start_tokens, saved = time.perf_counter(), step, task.tokens, None
    bar = progress(unit=task.unit)
    if state.is_main:
        bar.start()
    progress_task = bar.add_task(task.name, total=total_steps * task.per_step, completed=step * task.per_step)
    stream = task.micro_batches(step)
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            micro_losses = []
            for _ in range(train.grad_accum):
                loss = task.loss(engine, next(stream))
                engine.backward(loss)
                engine.step()  # DeepSpeed only updates at the accumulation boundary
                micro_losses.append(loss.detach().float())
            step += 1
            mean = torch.stack(micro_losses).mean()
            if state.world_size > 1:  # equal micro steps per rank: the mean of means is the mean
                dist.all_reduce(mean, op=dist.ReduceOp.SUM)
                mean /= state.world_size
            elapsed = time.perf_counter() - t0
            measured = task.end_step(elapsed)
            losses.append(mean.item())
            grad_norm = engine.get_global_grad_norm()
            record = {
                "loss": round(losses[-1], 6),
                # the schedule at the peak rate (the first parameter group may be a part with its own rate)
                "lr": peak_lr * scheduler.get_last_lr()[0] / scheduler.base_lrs[0],
                "grad_norm": None if grad_norm is None else float(grad_norm),
                **measured,
                "step_time_s": round(elapsed, 3),
            }
            if torch.cuda.is_available():
                record["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
            record["peak_host_mem_gb"] = peak_host_memory_gb()
            log.log(step, **record)
            note = f" {record['tokens_per_s']:,.0f} tok/s" if task.unit != "tok" and "tokens_per_s" in record else ""
            bar.update(progress_task, advance=task.per_step,
                       description=f"step {step}/{total_steps} loss {losses[-1]:.4f}{note}")
            if step % train.save_every == 0 or step == total_steps:
                client = {"step": step, **task.client_state()}
                saved = checkpoint.save(
                    engine, output_dir, step, client_state=client, save_model=save_model,
                    state_dict=lambda: deepspeed_setup.full_state_dict(engine),
                    trainer_state={**client, "loss": losses[-1], "recipe": recipe},
                    needed_bytes=needed_bytes, is_main=state.is_main,
                )
    finally:
        if state.is_main:
            bar.stop()
        log.close()
    wall = time.perf_counter() - start_time
    tokens_now = task.tokens - start_tokens
    summary = {
        "steps": step,
        "steps_this_run": step - start_step,
        "tokens": task.tokens,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "losses": losses,
        "tokens_per_s": round(tokens_now / wall, 1) if step > start_step else None,
        "wall_s": round(wall, 1),
        "checkpoint": str(saved) if saved else None,
        "output_dir": str(output_dir),
    }
    if state.is_main:
        if losses:
            stderr.print(
                f"[green]Done:[/green] {summary['steps_this_run']} steps ({step}/{total_steps}), {tokens_now:,} tokens "
                f"in {wall:.0f} s ({summary['tokens_per_s']:,} tok/s), loss {losses[0]:.4f} -> {losses[-1]:.4f}; "
                f"checkpoint {saved}, metrics {output_dir / METRICS}"
            )
        else:
            stderr.print(f"Nothing to do: the checkpoint is already at step {step} of {total_steps}.")
    task.finish(summary)
    return summary


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop the records after `step` (written after the checkpoint a run resumes from), so the
    file holds one record per step once the resumed run has written its own; damaged lines (a
    kill's torn tail, bytes that are not JSON) are set aside first, as in every run folder."""
    from longva_cli.engine.runs import set_aside_damaged, split_lines, write_atomic

    set_aside_damaged(path, METRICS_FIELDS)
    if not path.is_file():
        return
    records, lines, _ = split_lines(path.read_bytes(), METRICS_FIELDS)
    kept = [line for record, line in zip(records, lines) if isinstance(record["step"], int) and record["step"] <= step]
    if len(kept) < len(lines):
        write_atomic(path, b"".join(kept))


def peak_host_memory_gb() -> float | None:
    """This process's peak resident memory (Linux reports KiB, macOS bytes)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1e9 if sys.platform == "darwin" else 1e6), 3)
