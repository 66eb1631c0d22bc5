"""What a checkpoint folder holds, read without torch: its weight files, the tensor names in
their headers, and which of the files a complete LongVA checkpoint needs are missing.

`longva download` and the hub lookup check folders with these alone, so they start in a fraction
of a second; `checkpoint.py` loads the weights.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from longva_cli.errors import LongVAError
from longva_cli.model.config import read_json, refetch_hint

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def weight_map(folder: Path) -> dict[str, str]:
    """Tensor name -> safetensors file, from the index or the single file."""
    folder = Path(folder)
    if (folder / INDEX_FILE).is_file():
        files = read_json(folder / INDEX_FILE, folder).get("weight_map")
        if not isinstance(files, dict) or not all(isinstance(name, str) for name in files.values()):
            raise LongVAError(f"{folder / INDEX_FILE} has no weight_map of tensor names to files; {refetch_hint(folder)}.")
        for name in set(files.values()):
            if not stays_inside(name):
                raise LongVAError(
                    f"{folder / INDEX_FILE} names the weight file {name!r}, which is outside the checkpoint folder; "
                    f"{refetch_hint(folder)}."
                )
        return files
    if (folder / SINGLE_FILE).is_file():
        return {key: SINGLE_FILE for key in tensor_names(folder / SINGLE_FILE)}
    if list(folder.glob("*.bin")):
        raise LongVAError(f"{folder} holds PyTorch .bin weights; LongVA checkpoints are safetensors: re-download or convert it.")
    raise LongVAError(f"{folder} has no weights ({SINGLE_FILE} or {INDEX_FILE}); the download may be incomplete: run `longva download` again.")


def stays_inside(name: str) -> bool:
    """Whether a file name from an index stays inside the folder: relative, without `..` (read
    as written: the hub cache's links to its blobs are followed, not judged)."""
    path = PurePosixPath(name)
    return bool(name) and "\\" not in name and not path.is_absolute() and ".." not in path.parts


def tensor_names(path: Path) -> list[str]:
    """The tensors a safetensors file holds, read from its header (see `tensor_shapes`)."""
    return list(tensor_shapes(path))


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape, read from a safetensors file's header; a LongVAError when the file is
    empty, truncated or not safetensors at all (safetensors checks that the header's offsets
    cover the file exactly, so a cut-off download is caught here, before any weight is read)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(path, framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except SafetensorError as err:
        reason = str(err).removeprefix("Error while deserializing header: ")
        raise LongVAError(f"{path} is truncated or not a safetensors file ({reason}); {refetch_hint(path.parent)}.") from None
    except OSError as err:
        raise LongVAError(f"{path} cannot be read ({err.strerror or err}); check its permissions, or {refetch_hint(path.parent)}.") from None


def check_weight_files(folder: Path, files: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """Every weight file named in `files` is present and a whole safetensors file; the shapes of
    the tensors they hold, by name."""
    folder = Path(folder)
    shapes = {}
    for name in sorted(set(files.values())):
        if not (folder / name).is_file():
            raise LongVAError(f"{folder} lacks the weight file {name}; run `longva download` again to complete it.")
        shapes.update(tensor_shapes(folder / name))
    return shapes


def missing_files(folder: Path) -> list[str]:
    """What a LongVA checkpoint folder lacks among config, weights and tokenizer files.

    An unreadable index lists no shards here; loading then says what is wrong with it.
    """
    folder = Path(folder)
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if (folder / INDEX_FILE).is_file():
        try:
            shards = set(weight_map(folder).values())
        except LongVAError:
            shards = set()
        missing += sorted(f for f in shards if not (folder / f).is_file())
    elif not (folder / SINGLE_FILE).is_file():
        missing.append(f"{SINGLE_FILE} or {INDEX_FILE}")
    if not (folder / "tokenizer.json").is_file() and not (folder / "vocab.json").is_file():
        missing.append("tokenizer.json (or vocab.json + merges.txt)")
    if not (folder / "tokenizer_config.json").is_file():
        missing.append("tokenizer_config.json")
    return missing
