"""What the benchmark scripts share: `--smoke`, invariant checks, measuring child processes and
their sections of benchmarks/RESULTS.md. Imported by the scripts next to it; not a benchmark.

`--smoke` runs a script's own code on its smallest shapes in seconds and keeps every check it
makes on a full run, so tests/test_benchmarks.py can run each script in CI and a benchmark that
stops working fails a test instead of a reader.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def parse_args(parser: argparse.ArgumentParser, smoke: dict[str, object], *, records: bool = False) -> argparse.Namespace:
    """Parse the command line; with --smoke, `smoke` replaces the size defaults (flags given still win).

    A script that writes its section of RESULTS.md (`records`) gets --results; a smoke run writes
    to a temporary copy of RESULTS.md unless --results names a file, so it never replaces figures.
    """
    parser.add_argument("--smoke", action="store_true", help="the same run on the smallest shapes, in seconds, with the same checks (CI runs it)")
    if records:
        parser.add_argument("--results", type=Path, help="the RESULTS.md to write the section to [default: benchmarks/RESULTS.md; "
                            "with --smoke, a temporary copy of it]")
    args = parser.parse_args()
    if args.smoke:
        parser.set_defaults(**smoke)
        args = parser.parse_args()
    if records and args.results is None:
        args.results = RESULTS
        if args.smoke:
            args.results = Path(tempfile.mkdtemp(prefix="longva-smoke-")) / "RESULTS.md"
            shutil.copyfile(RESULTS, args.results)
    return args


def check(holds: bool, invariant: str) -> None:
    """Exit non-zero naming the invariant a run broke: figures from such a run would mislead."""
    if not holds:
        sys.exit(f"invariant broken: {invariant}")


def ratio(numerator: float, denominator: float, what: str) -> float:
    """numerator / denominator, checked to be a positive finite number."""
    value = numerator / denominator if denominator else math.inf
    check(math.isfinite(value) and value > 0, f"{what} is {numerator} / {denominator}, not a positive finite ratio")
    return value


def run_json(command: list[str], env: dict[str, str] | None = None) -> dict:
    """Run a measuring child process; return the JSON object on the last line of its stdout."""
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"a measuring process failed (exit {done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def provenance() -> str:
    """Date, machine and software of this run, for the line beside its figures."""
    return (f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} "
            f"at the end, Python {platform.python_version()}, torch {metadata.version('torch')}")


def command_line() -> str:
    """The command that made this run, as a reader would type it from the repository root (with
    OMP_NUM_THREADS where it was set: on a shared CPU it changes the timings several times over)."""
    python = os.path.relpath(sys.executable, ROOT) if Path(sys.executable).is_relative_to(ROOT) else "python"
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}" if "OMP_NUM_THREADS" in os.environ else ""
    return " ".join([threads, python, os.path.relpath(Path(sys.argv[0]).resolve(), ROOT), shlex.join(sys.argv[1:])]).strip()


def write_section(results: Path, heading: str, body: str) -> None:
    """Replace `heading`'s section of `results` (or append it), leaving the other sections as they are."""
    text = results.read_text() if results.is_file() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    section = f"{heading}\n\n{body.strip()}\n\n"
    others = [line for line in pattern.sub("", text).splitlines() if line.startswith("## ")]
    text = pattern.sub(lambda _: section, text, count=1) if pattern.search(text) else text.rstrip() + "\n\n" + section
    partial = results.with_name(results.name + ".partial")
    partial.write_text(text.rstrip() + "\n")
    partial.replace(results)
    written = results.read_text()
    found = pattern.search(written)
    check(found is not None and found.group(0).strip() == section.strip(), f"the section '{heading}' is in {results}")
    check([line for line in pattern.sub("", written).splitlines() if line.startswith("## ")] == others,
          f"the other sections of {results} are kept")
    print(f"wrote '{heading}' in {results}", file=sys.stderr)
