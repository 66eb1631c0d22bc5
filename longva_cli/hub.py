"""Finding models and data sets: short names, the local hub cache, and resumable downloads.

huggingface_hub does the transfer (resuming partial files, verifying, caching); this module
adds the short names, the check that a model folder is complete, and one-sentence errors.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from longva_cli.errors import LongVAError

# short name -> (hub repo, repo type, what it is)
ALIASES: dict[str, tuple[str, str, str]] = {
    "LongVA-7B": ("lmms-lab/LongVA-7B", "model", "LongVA, the model of the paper"),
    "LongVA-7B-DPO": ("lmms-lab/LongVA-7B-DPO", "model", "LongVA after DPO on video preference pairs (default for ask)"),
    # The hub repo really is spelled "Instrcuct".
    "Qwen2-7B-Instruct-224K": ("lmms-lab/Qwen2-7B-Instrcuct-224K", "model", "the 224K-context text model LongVA starts from"),
    "clip-vit-large-patch14-336": ("openai/clip-vit-large-patch14-336", "model", "the CLIP vision tower"),
    "v_niah_needles": ("lmms-lab/v_niah_needles", "dataset", "the five V-NIAH needle images and questions"),
}

DEFAULT_MODEL = "lmms-lab/LongVA-7B-DPO"

REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_repo(name: str) -> tuple[str, str]:
    """(repo id, repo type) of a short name or an `org/name` id."""
    if name in ALIASES:
        repo, kind, _ = ALIASES[name]
        return repo, kind
    lowered = {alias.lower(): alias for alias in ALIASES}
    if name.lower() in lowered:
        return resolve_repo(lowered[name.lower()])
    for repo, kind, _ in ALIASES.values():
        if repo == name:
            return repo, kind
    if REPO_ID.match(name):
        return name, "model"
    raise LongVAError(f"unknown model {name!r}; use a local folder, an org/name hub id, or one of: {', '.join(ALIASES)}.")


def download(
    name: str,
    *,
    local_dir: Path | None = None,
    revision: str | None = None,
    repo_type: str | None = None,
) -> Path:
    """Fetch (or finish fetching) a repo with progress bars; returns its local folder."""
    from huggingface_hub import snapshot_download

    repo, kind = resolve_repo(name)
    try:
        return Path(
            snapshot_download(
                repo,
                repo_type=repo_type or kind,
                revision=revision,
                local_dir=local_dir,
            )
        )
    except Exception as err:  # noqa: BLE001 - the hub raises many types; each maps to one sentence
        raise LongVAError(_explain(err, repo)) from None


def cached(name: str, revision: str | None = None, repo_type: str | None = None) -> Path | None:
    """The local snapshot of a repo in the hub cache, or None."""
    from huggingface_hub import snapshot_download

    repo, kind = resolve_repo(name)
    try:
        return Path(snapshot_download(repo, repo_type=repo_type or kind, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - any cache miss
        return None


def looks_local(name: str) -> bool:
    """Whether `name` means a folder on this machine rather than a hub id.

    `org/name` is a hub id unless a folder `org` exists here (`runs/align-tiny` names a run
    folder); anything starting with . / ~ or with more than one separator is a path.
    """
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        return True
    path = Path(name).expanduser()
    return path.exists() or (path.parent != Path(".") and path.parent.is_dir())


def nearest_checkpoints(path: Path, kind: str, count: int = 3) -> list[str]:
    """Existing model folders near a mistyped `path`, most similar name first."""
    import difflib

    from longva_cli.model.files import missing_files

    parent = path.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    candidates = []
    for folder in [parent, *sorted(p for p in parent.glob("*") if p.is_dir()), *sorted(p for p in parent.glob("*/*") if p.is_dir())]:
        complete = not missing_files(folder) if kind == "longva" else (folder / "config.json").is_file()
        if complete:
            candidates.append(str(folder))
    return difflib.get_close_matches(str(path), candidates, n=count, cutoff=0.0)


def locate_model(name: str, revision: str | None = None, allow_download: bool = True, kind: str = "longva") -> Path:
    """A complete model folder for a path, short name or hub id (kind "longva" needs a whole
    LongVA checkpoint; "causal-lm" any model folder with config.json and tokenizer)."""
    from longva_cli.model.files import missing_files

    if looks_local(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            if path.exists():
                raise LongVAError(f"{path} is a file; give the checkpoint folder that holds config.json.")
            near = nearest_checkpoints(path, kind)
            hint = f"; nearest checkpoints: {', '.join(near)}" if near else "; check the path (or give a hub id such as lmms-lab/LongVA-7B-DPO)"
            raise LongVAError(f"no such folder {path}{hint}.")
        missing = missing_files(path) if kind == "longva" else [f for f in ("config.json",) if not (path / f).is_file()]
        if missing:
            raise LongVAError(f"{path} is not a complete {'LongVA checkpoint' if kind == 'longva' else 'model folder'}: missing {', '.join(missing)}.")
        return path
    folder = cached(name, revision)
    if folder is not None and (not missing_files(folder) or (kind != "longva" and (folder / "config.json").is_file())):
        return folder
    if not allow_download:
        raise LongVAError(f"{name} is not in the local hub cache; run `longva download {name}` first.")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise LongVAError(f"{name} is not downloaded and HF_HUB_OFFLINE is set; run `longva download {name}` on a machine with network access.")
    folder = download(name, revision=revision)
    if kind == "longva":
        missing = missing_files(folder)
        if missing:
            raise LongVAError(f"{name} on the hub is not a complete LongVA checkpoint: it lacks {', '.join(missing)}.")
    return folder


def _explain(err: Exception, repo: str) -> str:
    kind = type(err).__name__
    text = str(err).splitlines()[0] if str(err) else kind
    if kind == "GatedRepoError":
        return f"{repo} is gated on the hub; accept its terms on its page and log in with `hf auth login`."
    if kind in ("RepositoryNotFoundError",):
        return f"{repo} was not found on the hub; check the name (or log in if it is private)."
    if kind == "RevisionNotFoundError":
        return f"{repo} has no such revision; check --revision."
    if kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or "connect" in text.lower() or "resolve" in text.lower():
        return f"cannot reach the Hugging Face hub to download {repo} and it is not cached; check the network (or HF_ENDPOINT) and try again."
    if isinstance(err, OSError) and getattr(err, "errno", None) == 28:
        return f"the disk filled up while downloading {repo}; free space and run the same command again to resume."
    return f"downloading {repo} failed ({kind}: {text}); run the same command again to resume."
