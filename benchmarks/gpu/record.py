"""The suite's results file: every stage writes its figures the moment it has them.

    python benchmarks/gpu/record.py environment RESULTS --mode gpu
    python benchmarks/gpu/record.py stage RESULTS NAME --status ok --seconds 12.5 --budget 60 [--fresh]
    python benchmarks/gpu/record.py pytest RESULTS JUNIT_XML

`update(results, section, figures)` is a read-modify-write under an exclusive lock that replaces
the file atomically, so a stage killed at its time limit leaves a whole, valid JSON file with
everything measured before it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on the results file's folder (no lock file left beside the results)."""
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        yield
    finally:
        os.close(folder)


def update(results: Path, section: str, figures: dict, replace: bool = False) -> None:
    """Merge `figures` into `results[section]` (a dotted section nests: "stages.scale"); with
    `replace`, they take the section's place, so nothing of an earlier run of it is left."""
    results = Path(results)
    results.parent.mkdir(parents=True, exist_ok=True)
    with _locked(results):
        data = json.loads(results.read_text()) if results.is_file() else {}
        *parents, last = section.split(".")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        if replace:
            node[last] = {}
        node.setdefault(last, {}).update(figures)
        data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        handle, temporary = tempfile.mkstemp(dir=results.parent, prefix=results.name, suffix=".tmp")
        with os.fdopen(handle, "w") as out:
            json.dump(data, out, indent=2, sort_keys=True)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, results)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(mode: str) -> dict:
    """The machine and software the figures were measured on."""
    import torch

    info = {
        "mode": mode,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "packages": {name: _version(name) for name in ("longva", "transformers", "accelerate", "deepspeed", "av", "flash-attn", "bitsandbytes", "pydantic")},
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(), gpu_memory_gib=round(props.total_memory / 2**30, 2),
                    cudnn=torch.backends.cudnn.version())
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            info["driver"] = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            info["driver"] = None
    return info


def pytest_counts(junit: Path) -> dict:
    """passed / failed / skipped / errors and each test's outcome, from pytest's JUnit XML."""
    import xml.etree.ElementTree as ElementTree

    outcomes = {}
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        if case.find("skipped") is not None:
            outcome = "skipped: " + (case.find("skipped").get("message") or "")
        elif case.find("failure") is not None:
            outcome = "failed: " + (case.find("failure").get("message") or "")[:300]
        elif case.find("error") is not None:
            outcome = "error: " + (case.find("error").get("message") or "")[:300]
        else:
            outcome = "passed"
        outcomes[name] = outcome
    counts = {kind: sum(o.split(":")[0] == kind for o in outcomes.values()) for kind in ("passed", "failed", "skipped", "error")}
    return {**counts, "tests": outcomes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    env = verbs.add_parser("environment")
    env.add_argument("results", type=Path)
    env.add_argument("--mode", required=True)
    stage = verbs.add_parser("stage")
    stage.add_argument("results", type=Path)
    stage.add_argument("name")
    stage.add_argument("--status", required=True)
    stage.add_argument("--seconds", type=float)
    stage.add_argument("--budget", type=float)
    stage.add_argument("--fresh", action="store_true", help="drop what an earlier run recorded for this stage")
    junit = verbs.add_parser("pytest")
    junit.add_argument("results", type=Path)
    junit.add_argument("junit", type=Path)
    args = parser.parse_args()
    if args.verb == "environment":
        update(args.results, "environment", environment(args.mode))
    elif args.verb == "stage":
        figures = {"status": args.status}
        if args.seconds is not None:
            figures["seconds"] = round(args.seconds, 1)
        if args.budget is not None:
            figures["budget_s"] = args.budget
        update(args.results, f"stages.{args.name}", figures, replace=args.fresh)
    elif args.junit.is_file():
        update(args.results, "stages.pytest", pytest_counts(args.junit))
    else:
        sys.exit(f"{args.junit} was not written: pytest did not get to report")


if __name__ == "__main__":
    main()
