"""What a result file records besides the numbers, so a score can be traced to its setup.

Scores of the original moved with lmms-eval and transformers versions and with the dtype;
every results.json therefore names the versions, the model's hub revision, frames, dtype and
date it was made with.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from importlib import metadata
from pathlib import Path

from longva_cli import __version__


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def model_revision(folder: Path | None) -> str | None:
    """The commit hash of a hub-cache snapshot (`.../snapshots/<hash>`), None for other folders."""
    if folder is None:
        return None
    folder = Path(folder)
    if folder.parent.name == "snapshots" and len(folder.name) == 40:
        return folder.name
    return None


def run_info(*, model: str, model_path: Path | None, frames: int, dtype: str, with_lmms_eval: bool = False, **extra) -> dict:
    """Versions, model revision and settings for a results file."""
    versions = {
        "longva": __version__,
        "transformers": package_version("transformers"),
        "torch": package_version("torch"),
    }
    if with_lmms_eval:
        versions["lmms-eval"] = package_version("lmms_eval")
    return {
        "model": model,
        "model_path": str(model_path) if model_path else None,
        "model_revision": model_revision(model_path),
        "frames": frames,
        "dtype": dtype,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
        **extra,
    }


def write_json(path: Path, data: dict) -> None:
    """Write through a temporary file and rename, so a crash never leaves half a results file."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
    os.replace(temporary, path)


def append_jsonl(path: Path, record: dict) -> None:
    """One record as one line in a single write on an O_APPEND file, flushed to disk."""
    line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
