"""fit24 stage: 3000 frames through `longva ask`'s engine path in a process capped at 24 GiB.

    python benchmarks/gpu/fit24.py --results OUT/gpu-results.json --work DIR [--deadline UNIX_TIME]   # GPU
    python benchmarks/gpu/fit24.py --results OUT/gpu-results.json --work DIR --tiny                   # CPU dry run

On a GPU the process may allocate at most 24 GiB (`torch.cuda.set_per_process_memory_fraction`),
as on an RTX 3090/4090, A10 or L4. A LongVA-7B-shaped checkpoint with random bf16 weights (the
scale stage's model, written to DIR so that it loads as a downloaded one would) is asked about a
3000-frame video exactly as `longva ask video.mp4 QUESTION --frames 3000 --memory-budget 22.5GiB
--temperature 0 --max-new-tokens 32` asks: `AskSettings.memory_plan` plans the run from the
config files, `AskSettings.open` loads the model with the settings the plan chose (on 22.5 GiB:
4-bit torchao weights, an fp8 KV cache, visual tokens in host memory and the vision tower
released), and the session answers.

Figures go to `stages.fit24` of the results file as soon as they exist: `plan` (the settings
chosen, the predicted peak and each part), `load`, `ask` (time to first token, decode tokens/s,
the measured peak allocated and its ratio to the prediction), then `niah` (one teacher-forced
V-NIAH cell at the same frame count through the same loaded model and KV storage), which is
recorded as skipped when the time left before `--deadline` would not finish it.

The dry run (`--tiny`) does the same with the tiny checkpoint on the CPU: 16 frames, and the
tightest budget the plan accepts (its predicted peak in the model's dtype). It cannot step down
the ladder there: the tiny model's peak is one batch of 336x336 frames being encoded, which no
setting a CPU offers (only the fp8 KV cache) makes smaller.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from pathlib import Path

import torch

import record
import scale

CAP = 24 * 2**30  # what the process may allocate on the GPU: a 24 GB card
BUDGET = "22.5GiB"  # the plan's budget: the cap less the CUDA context and the allocator's slack


def cap_gpu_memory(device: torch.device) -> dict:
    """Limit the caching allocator to `CAP` bytes (all of a card that has less)."""
    if device.type != "cuda":
        return {"cap": "none (CPU)"}
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, CAP / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return {"cap_gib": round(fraction * total / 2**30, 2), "fraction": round(fraction, 4), "device_total_gib": round(total / 2**30, 2)}


def write_checkpoint(folder: Path, tiny: bool, device: torch.device) -> Path:
    """The random checkpoint in the hub layout: the tiny one, or the scale stage's LongVA-7B shape
    built on `device` in bf16 and saved from there (the model is gone from the device after)."""
    from longva_cli.model.checkpoint import save_longva
    from longva_cli.model.tiny import save_tiny_tokenizer, write_tiny_checkpoint

    if tiny:
        return write_tiny_checkpoint(folder)
    longva = scale.build(False, device, torch.bfloat16)
    save_longva(longva.model, None, folder)
    save_tiny_tokenizer(longva.tokenizer, folder)
    del longva
    scale.reset_peak(device)
    return folder


def dry_run_budget(folder: Path, video: Path, frames: int) -> str:
    """The predicted peak of the ladder's first setting on the CPU, in bytes: the tightest budget that fits."""
    from longva_cli.ask import AskSettings

    roomy = AskSettings(model=str(folder), frames=frames, device="cpu", max_new_tokens=32, memory_budget="1TiB")
    return f"{roomy.memory_plan(video).estimates[0].peak}B"


def plan_figures(plan) -> dict:
    from longva_cli.engine.plan import GIB

    chosen = plan.chosen
    figures = {
        "budget_gib": round(plan.budget / GIB, 2), "budget_bytes": plan.budget, "frames": plan.work.frames,
        "line": plan.stderr_line() if chosen else plan.refusal(),
    }
    if chosen is not None:
        settings = chosen.settings
        figures.update(
            weights=settings.weights, kv_cache=settings.kv_cache, visual_tokens=settings.visual_tokens, vision_tower=settings.vision_tower,
            predicted_peak_gib=round(chosen.peak / GIB, 2), predicted_peak_bytes=chosen.peak, predicted_encoding_peak_gib=round(chosen.encoding_peak / GIB, 2),
            predicted_prefill_peak_gib=round(chosen.prefill_peak / GIB, 2), host_gib=round(chosen.host / GIB, 2),
            parts_gib={part: round(size / GIB, 3) for part, size in chosen.parts.items()},
        )
    return figures


def measured_against_plan(figures: dict, predicted_gib: float) -> dict:
    """The measured peak as a share of the plan's prediction (on a GPU; a CPU's peak RSS counts the whole process)."""
    if "peak_allocated_gib" in figures:
        return {"peak_allocated_over_predicted": round(figures["peak_allocated_gib"] / predicted_gib, 3)}
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True, help="folder for the checkpoint and the video")
    parser.add_argument("--tiny", action="store_true", help="the tiny checkpoint on the CPU (the suite's dry run)")
    parser.add_argument("--frames", type=int, help="frames to ask about (default 3000; 16 with --tiny)")
    parser.add_argument("--memory-budget", help=f"as `longva ask --memory-budget` (default {BUDGET}; with --tiny, the plan's predicted peak)")
    parser.add_argument("--depth", type=float, default=0.9, help="needle depth of the V-NIAH cell")
    parser.add_argument("--deadline", type=float, help="when the stage's time is up (Unix time, from run.sh): a V-NIAH cell that cannot finish by then is skipped")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from longva_cli.ask import AskSettings
    from longva_cli.engine import drive
    from longva_cli.engine.plan import ModelShape, kv_bytes, weight_bytes

    frames = args.frames or (16 if args.tiny else 3000)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def report(section: str, figures: dict) -> None:
        record.update(args.results, f"stages.fit24.{section}", figures)
        print(f"fit24 {section}: {figures}", flush=True)

    report("memory_cap", cap_gpu_memory(device))
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    video = scale.write_video(args.work / "long.mp4", frames)
    folder = write_checkpoint(args.work / "checkpoint", args.tiny, device)
    report("setup", {"frames": frames, "checkpoint": "tiny" if args.tiny else "LongVA-7B shape, random bf16", "seconds": round(time.perf_counter() - started, 2)})

    budget = args.memory_budget or (dry_run_budget(folder, video, frames) if args.tiny else BUDGET)
    settings = AskSettings(
        model=str(folder), frames=frames, device=device.type, memory_budget=budget, temperature=0, max_new_tokens=32, use_cache=False
    )
    plan = settings.memory_plan(video)
    planned = plan_figures(plan)
    report("plan", planned)
    if plan.chosen is None:
        raise SystemExit(f"fit24: {plan.refusal()}")

    peaks = scale.device_peaks(device, torch.bfloat16 if device.type == "cuda" else torch.float32, args.tiny)
    scale.reset_peak(device)
    started = time.perf_counter()
    session, sampling = settings.open(video, keep_history=False)  # plans again, prints the plan's line, loads
    longva = session.model
    report("load", {"seconds": round(time.perf_counter() - started, 2), **scale.peak_memory(device)})

    shape, chosen = ModelShape.from_folder(folder), plan.chosen.settings
    element = longva.model.dtype.itemsize

    def decode_limit_at(context: int) -> float:  # each token reads the weights and the KV cache as the plan holds them
        read = weight_bytes(shape, chosen.weights, element) + kv_bytes(shape, context, chosen.kv_cache, element)
        return peaks["copy_gbps"] * 1e9 / read

    asked = scale.timed_answer(longva, lambda on_event: drive(session.ask(scale.QUESTION, sampling), on_event), device, peaks, decode_limit_at)
    report("ask", {**asked, **measured_against_plan(asked, planned["predicted_peak_gib"])})
    del session  # its KV cache goes before the V-NIAH cell makes its own
    gc.collect()

    def seconds_left() -> float:  # with a margin for writing the results
        return float("inf") if args.deadline is None else args.deadline - time.time() - 10

    def on_cell(name: str, figures: dict) -> None:
        report("niah", {"cell": name, **figures, **measured_against_plan(figures, planned["predicted_peak_gib"])})

    rate = asked["prefill"]["tflops_achieved"] * 1e12
    scale.niah_cells(longva, frames, [args.depth], device, seconds_left, rate, on_cell, peaks, haystack_on_host=chosen.visual_tokens == "host")


if __name__ == "__main__":
    main()
