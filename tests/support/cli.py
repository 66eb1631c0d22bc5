"""The `longva` executable run as a user runs it, and what its errors must look like."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from support import REPO


def longva(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "longva_cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def assert_clean_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert fragment in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")


def readme_block(heading: str) -> list[str]:
    """The command lines of the first ```bash block under a README heading (comments dropped)."""
    text = (REPO / "README.md").read_text()
    section = text.split(f"\n{heading}\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def run_lines(lines: list[str], cwd, env: dict, timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """Shell lines that do not depend on one another, two at a time (most of each is single-threaded
    imports, so two cores run two of them in about the time of one), with their results in order."""
    from concurrent.futures import ThreadPoolExecutor

    def run(line: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-o", "pipefail", "-c", line], cwd=cwd, env={**env, "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True, timeout=timeout)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(run, lines))


def fail_after(monkeypatch, owner, name: str, calls: int, error: BaseException | type = KeyboardInterrupt):
    """Patch `owner.name` so that its first `calls` calls run as usual and the next one raises
    `error` (Ctrl-C by default: a run stopped part-way); the real function, to put back for a rerun."""
    real = getattr(owner, name)
    made = []

    def failing(*args, **kwargs):
        if len(made) == calls:
            raise error
        made.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
    return real
