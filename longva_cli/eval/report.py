"""What a result file records besides the numbers, so a score can be traced to its setup.

Scores of the original moved with lmms-eval and transformers versions and with the dtype;
every results.json therefore names the versions, the model's hub revision, frames, dtype and
date it was made with.
"""

from __future__ import annotations

import datetime as dt
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
