"""`longva download`: models and data sets from the Hugging Face hub, resumable, with progress."""

from __future__ import annotations

from pathlib import Path

import typer

from longva_cli.console import stderr
from longva_cli.errors import LongVAError


def download(name: str, local_dir: Path | None = None, revision: str | None = None) -> Path:
    """Download `name` (short name or org/name); check a model folder is complete; return it."""
    from longva_cli import hub
    from longva_cli.model.files import missing_files

    repo, kind = hub.resolve_repo(name)
    folder = hub.download(name, local_dir=local_dir, revision=revision)
    if kind == "model":
        missing = missing_files(folder)
        if missing:
            raise LongVAError(f"{repo} downloaded to {folder} but lacks {', '.join(missing)}; the repo is incomplete.")
    return folder


def command(
    name: str = typer.Argument(None, help="Short name (see --list) or a hub id such as lmms-lab/LongVA-7B."),
    list_names: bool = typer.Option(False, "--list", help="List the short names and exit."),
    local_dir: Path = typer.Option(None, "--local-dir", help="Put the files in this folder instead of the hub cache."),
    revision: str = typer.Option(None, "--revision", help="Branch, tag or commit to fetch."),
) -> None:
    """Download a model or data set from the Hugging Face hub (resumes an interrupted download).

    examples:
      longva download --list
      longva download LongVA-7B-DPO
      longva download v_niah_needles
      longva download lmms-lab/LongVA-7B --local-dir weights/LongVA-7B --revision main
    """
    from longva_cli import hub

    if list_names:
        for alias, (repo, kind, about) in hub.ALIASES.items():
            typer.echo(f"{alias:28} {repo:36} {kind:8} {about}")
        return
    if not name:
        raise LongVAError("say what to download, e.g. `longva download LongVA-7B-DPO` (see `longva download --list`).")
    folder = download(name, local_dir, revision)
    stderr.print(f"[green]Downloaded[/green] {name} to {folder}")
    typer.echo(str(folder))
