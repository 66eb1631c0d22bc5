"""`longva download`: models and data sets from the Hugging Face hub, resumable, with progress;
and `longva download tiny`, which writes a tiny random kit to try every command without a GPU."""

from __future__ import annotations

import contextlib
import json
import shlex
import sys
from pathlib import Path

import typer

from longva_cli.console import stderr
from longva_cli.errors import LongVAError

TINY = "tiny"
TINY_FOLDER = Path("longva-tiny")
TINY_ABOUT = "written here, not downloaded: a tiny random LongVA and causal LM, a clip, needles and a text"


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


def write_tiny_kit(folder: Path) -> Path:
    """Everything the README's "Try it without a GPU" runs, in seconds and without the hub:

        longva/         a random LongVA in the real hub layout (sharded safetensors, LongVA's key
                        names and config fields, CLIP geometry; tiny widths)
        qwen2/          a random Qwen2 causal LM with the same tiny tokenizer
        clip.mp4        a 12-second H.264 clip (a red square moving over green)
        needles/        two needle images and needles.jsonl, for `niah video --needles`
        book.txt        filler text, for `eval ppl --data` and extend-text's data.source

    Returns the folder, absolute (the LongVA config names its tower folder by absolute path).
    """
    from PIL import Image

    from longva_cli.model.tiny import write_tiny_checkpoint, write_tiny_text_model
    from longva_cli.niah.text import synthetic_haystack
    from longva_cli.train.tiny_example import picture, write_video

    folder = Path(folder).expanduser().resolve()
    (folder / "needles").mkdir(parents=True, exist_ok=True)
    write_tiny_checkpoint(folder / "longva")
    write_tiny_text_model(folder / "qwen2")
    write_video(folder / "clip.mp4", "red", "green", frames=72)  # 6 frames a second: 12 s, so 12 V-NIAH frames
    needles = []
    for shape, background, answer in (("blue", "yellow", "A"), ("yellow", "blue", "B")):
        name = f"{shape}-on-{background}.png"
        Image.fromarray(picture(shape, background, 120, 120)).save(folder / "needles" / name)
        needles.append({"image": name, "question": "\nWhat colour is the square? A. blue B. yellow", "answer": answer})
    (folder / "needles" / "needles.jsonl").write_text("".join(json.dumps(n) + "\n" for n in needles))
    (folder / "book.txt").write_text(synthetic_haystack(seed=0, sentences=100) + "\n")
    return folder


def tiny_commands(folder: str) -> list[str]:
    """The commands to try on a kit written to `folder` (as the user named it)."""
    at = shlex.quote(folder.rstrip("/"))
    return [
        f'longva ask {at}/clip.mp4 "What is moving?" --model {at}/longva --max-new-tokens 16',
        f"printf 'What happens?\\nAnd then?\\n' | longva chat {at}/clip.mp4 --model {at}/longva --max-new-tokens 8",
        f"longva niah video --haystack {at}/clip.mp4 --needles {at}/needles --model {at}/longva --min-frames 4 --max-frames 12 "
        "--frame-step 4 --depth-step 0.5 --output runs/niah-tiny",
        f"longva eval ppl --model {at}/qwen2 --data {at}/book.txt --min-tokens 128 --max-tokens 512 --output runs/ppl-tiny",
        f"longva extend-text --recipe extend-text/tiny-cpu model.init=pretrained model.name_or_path={at}/qwen2 "
        f"data.source={at}/book.txt train.max_steps=4 --output runs/extend-tiny",
    ]


def command(
    name: str = typer.Argument(None, help="Short name (see --list), a hub id such as lmms-lab/LongVA-7B, or tiny."),
    list_names: bool = typer.Option(False, "--list", help="List the short names and exit."),
    local_dir: Path = typer.Option(
        None, "--local-dir", "--output", "-o", help=f"Put the files in this folder instead of the hub cache (tiny: [default: {TINY_FOLDER}])."
    ),
    revision: str = typer.Option(None, "--revision", help="Branch, tag or commit to fetch."),
) -> None:
    """Download a model or data set from the Hugging Face hub (resumes an interrupted download).

    `longva download tiny` writes a tiny random LongVA, a tiny causal LM, a clip, needles and a
    text instead, in seconds and without the hub, and prints commands that try each part of
    longva on them. The folder a download ends in is printed on stdout.

    examples:
      longva download --list
      longva download tiny
      longva download LongVA-7B-DPO
      longva download v_niah_needles
      longva download lmms-lab/LongVA-7B --local-dir weights/LongVA-7B --revision main
    """
    from longva_cli import hub

    if list_names:
        for alias, (repo, kind, about) in hub.ALIASES.items():
            typer.echo(f"{alias:28} {repo:36} {kind:8} {about}")
        typer.echo(f"{TINY:28} {'-':36} {'kit':8} {TINY_ABOUT}")
        return
    if not name:
        raise LongVAError("say what to download, e.g. `longva download LongVA-7B-DPO` (see `longva download --list`).")
    if name == TINY:
        target = local_dir or TINY_FOLDER
        # stdout carries the folder only: transformers' save_pretrained imports DeepSpeed where it
        # is installed, whose first import prints its accelerator guess on stdout
        with contextlib.redirect_stdout(sys.stderr):
            folder = write_tiny_kit(target)
        stderr.print(f"[green]Wrote[/green] a tiny random LongVA ({target}/longva), a tiny causal LM ({target}/qwen2), a clip, "
                     "needles and a text. Try:")
        for line in tiny_commands(str(target)):
            stderr.print(f"  {line}", markup=False)
        typer.echo(str(folder))
        return
    folder = download(name, local_dir, revision)
    stderr.print(f"[green]Downloaded[/green] {name} to {folder}")
    typer.echo(str(folder))
