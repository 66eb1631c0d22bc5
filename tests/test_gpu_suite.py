"""The GPU suite (`benchmarks/gpu/run.sh`) cannot rot: its CPU dry run runs every stage here."""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu"
sys.path.insert(0, str(SUITE))

import record  # noqa: E402
import scale  # noqa: E402


@pytest.mark.integration
@pytest.mark.timeout(450)
def test_cpu_dry_run_fills_every_stage(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    # no wheel folder: this machine's interpreter already has av and DeepSpeed (and may not be 3.12)
    command = ["bash", str(SUITE / "run.sh"), "--cpu-dry-run", "--out", str(out), "--wheels", str(tmp_path / "none")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=430)
    logs = {log.name: log.read_text()[-3000:] for log in out.glob("*.log")}
    assert done.returncode == 0, (done.stdout[-3000:], logs)
    results = json.loads((out / "gpu-results.json").read_text())
    stages = results["stages"]
    assert {name: stages[name]["status"] for name in ("install", "pytest", "train", "scale", "fit24", "suite")} == dict.fromkeys(
        ("install", "pytest", "train", "scale", "fit24", "suite"), "ok"
    )
    assert results["environment"]["mode"] == "cpu-dry-run" and results["environment"]["packages"]["longva"]

    tests = stages["pytest"]["tests"]
    assert tests and stages["pytest"]["failed"] == stages["pytest"]["error"] == 0
    assert stages["pytest"]["skipped"] + stages["pytest"]["passed"] == len(tests)

    train = stages["train"]
    assert train["steps"] == 3 and train["tokens_per_s"] > 0 and train["losses"][-1] < train["losses"][0]
    phases = train["phases_s"]
    assert set(phases) == {"startup", "steps", "last_checkpoint", "exit"} and all(seconds >= 0 for seconds in phases.values())
    assert sum(phases.values()) <= train["wall_s"] + 0.5  # the parts of one wall time (rounded to 0.1 s each)

    ask = stages["scale"]["ask"]
    assert ask["frames"] == 16 and ask["prompt_tokens"] > 16 * 144 and ask["generated_tokens"] >= 1
    assert ask["time_to_first_token_s"] >= ask["timings"]["encode_s"] and ask["prefill"]["tflop"] > 0
    assert set(stages["scale"]["components"]) >= {"decode_s", "preprocess_s", "vision_encode_s"}
    # measured against the device, not a constant: its matmul peak and copy bandwidth
    peaks = stages["scale"]["peaks"]
    assert peaks["matmul_tflops"] > 0 and peaks["copy_gbps"] > 0
    assert 0 < ask["prefill"]["fraction_of_measured_matmul_peak"] and 0 < ask["decode_fraction_of_bandwidth_limit"]
    assert stages["scale"]["ask_8_frames"]["frames"] == 8 and stages["scale"]["kernels"]["attn"] == "auto"
    first, second = stages["scale"]["niah"]["depth_90pct"], stages["scale"]["niah"]["depth_100pct"]
    assert first["reused_tokens"] == 0 and first["forwarded_tokens"] == first["sequence_tokens"] - 1
    # the second depth shares the system prompt and the frames before the first needle
    assert second["reused_tokens"] > 0.8 * second["sequence_tokens"]
    assert second["reused_tokens"] + second["forwarded_tokens"] == second["sequence_tokens"] - 1
    # fp8 KV against the model's dtype in teacher-forced V-NIAH: figures for every answer position, a cache under half the size
    fp8 = stages["scale"]["kv_fp8"]
    assert fp8["frames"] == 8 and fp8["answer_positions"] >= 3 and 0 <= fp8["argmax_agreement"] <= fp8["answer_positions"]
    assert fp8["kv_bytes"]["float8_e4m3fn"] < fp8["kv_bytes"]["float32"] / 2 and fp8["max_abs_logit_diff"] > 0

    # fit24: planned at the tightest budget that fits, then answered through the engine path `ask --memory-budget` takes
    fit24 = stages["fit24"]
    plan = fit24["plan"]
    assert (plan["frames"], plan["weights"], plan["kv_cache"], plan["visual_tokens"]) == (16, "fp32", "fp32", "device")
    assert plan["predicted_peak_bytes"] == plan["budget_bytes"] > 0 and plan["parts_gib"]["KV cache"] > 0
    assert plan["line"].startswith("Memory plan for 16 frames on cpu: fp32 weights, fp32 KV cache")
    asked = fit24["ask"]
    assert asked["frames"] == 16 and asked["prompt_tokens"] > 16 * 144 and asked["generated_tokens"] == 32
    assert asked["time_to_first_token_s"] >= asked["timings"]["encode_s"] and asked["decode_tokens_per_s"] > 0
    assert fit24["memory_cap"] == {"cap": "none (CPU)"} and fit24["load"]["seconds"] > 0
    cell = fit24["niah"]
    assert cell["cell"] == "depth_90pct" and cell["forwarded_tokens"] == cell["sequence_tokens"] - 1 and len(cell["predicted_ids"]) >= 1


@pytest.mark.integration
@pytest.mark.parametrize("arguments, complaint", [
    (["--stages", "train,bogus"], "not 'bogus'"),
    (["--stages", "install"], "not 'install'"),
    (["--budget", "train=soon"], "not 'train=soon'"),
    (["--budget", "warmup=30"], "not 'warmup=30'"),
    ([], "holds an earlier run; add --overwrite"),
])
def test_bad_arguments_and_a_used_folder_are_refused_before_anything_is_touched(tmp_path, arguments, complaint):
    out = tmp_path / "out"
    out.mkdir()
    (out / "gpu-results.json").write_text('{"from": "the last run"}')
    done = subprocess.run(["bash", str(SUITE / "run.sh"), "--out", str(out), *arguments], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and complaint in done.stderr and done.stderr.count("\n") == 1
    assert (out / "gpu-results.json").read_text() == '{"from": "the last run"}'


def _write(results: Path, worker: int) -> None:
    for step in range(20):
        record.update(results, f"stages.worker{worker}", {f"step{step}": step})


def test_a_rerun_stage_replaces_its_own_figures_and_keeps_the_others(tmp_path):
    results = tmp_path / "gpu-results.json"
    record.update(results, "stages.scale", {"status": "ok", "niah": {"depth_100pct": {"skipped": "no time"}}})
    record.update(results, "stages.train", {"status": "timed out after 70 s"})
    record.update(results, "stages.train", {"status": "running"}, replace=True)
    record.update(results, "stages.train", {"status": "ok", "steps": 4})
    stages = json.loads(results.read_text())["stages"]
    assert stages == {"scale": {"status": "ok", "niah": {"depth_100pct": {"skipped": "no time"}}}, "train": {"status": "ok", "steps": 4}}


def test_concurrent_updates_keep_every_figure(tmp_path):
    results = tmp_path / "gpu-results.json"
    workers = [multiprocessing.get_context("spawn").Process(target=_write, args=(results, n)) for n in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    data = json.loads(results.read_text())
    assert all(data["stages"][f"worker{n}"] == {f"step{s}": s for s in range(20)} for n in range(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-results.json"]  # no lock or temporary files left


def test_prefill_flops_count_every_matmul_and_each_visible_key():
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    model = Qwen2ForCausalLM(copy.deepcopy(config))
    weights = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    past, tokens, logits = 7, 5, 2
    head_width = config.num_attention_heads * (config.hidden_size // config.num_attention_heads)
    keys_seen = sum(position + 1 for position in range(past, past + tokens))  # position i sees keys 0..i
    expected = 2 * weights * tokens + config.num_hidden_layers * 4 * head_width * keys_seen + 2 * 32 * 50 * logits
    assert scale.prefill_flops(config, tokens, past=past, logit_rows=logits) == expected


def test_vniah_cells_that_cannot_finish_in_time_are_skipped_not_cut_off():
    import torch

    longva = scale.build(True, torch.device("cpu"), torch.float32)
    cells = {}
    peaks = {"matmul_tflops": 1.0, "copy_gbps": 1.0}
    scale.niah_cells(longva, 4, [0.5, 1.0], torch.device("cpu"), lambda: 5.0, 1.0, cells.__setitem__, peaks)  # 1 FLOP/s
    assert set(cells) == {"depth_50pct", "depth_100pct"}
    assert all("skipped" in figures and "seconds" not in figures for figures in cells.values())
    assert "skipped" in scale.kv_fp8_agreement(longva, 4, 0.9, torch.device("cpu"), lambda: 5.0, 1.0)
