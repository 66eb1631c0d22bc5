"""Where text comes from, by one set of rules for training (`extend-text`) and `eval ppl`.

A source is a .txt (one document), .jsonl (one a line, in a text field) or .parquet file (one a
row, in a text column), a folder of such files, a folder written by `datasets`' `save_to_disk`,
or a hub dataset name such as `emozilla/pg19-test`. Each command names its own settings (`--data`,
`data.source`, ...) so the errors say which value to change.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from longva_cli.checks import require_extra
from longva_cli.errors import LongVAError

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
SAVED_DATASET_FILES = ("dataset_info.json", "dataset_dict.json", "state.json")  # what save_to_disk writes


def is_local(source: str) -> bool:
    """A path (existing or meant to be) rather than a hub dataset name like `org/name`."""
    return (
        Path(source).expanduser().exists()
        or source.startswith((".", "/", "~"))
        or source.endswith(TEXT_SUFFIXES)
        or source.count("/") != 1
    )


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in SAVED_DATASET_FILES)


def text_files(path: Path, setting: str, hint: str) -> list[Path]:
    """The text files `path` names: itself, or those under it; `setting` names the flag or
    recipe key that gave it and `hint` what it may be, for the error messages."""
    if path.is_file():
        if path.suffix not in TEXT_SUFFIXES:
            raise LongVAError(f"{setting} {path} is not a .txt, .jsonl or .parquet file; {hint}.")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise LongVAError(f"{setting} {path} holds no .txt, .jsonl or .parquet files; {hint}.")
    return files


def read_documents(file: Path, text_field: str, setting: str) -> Iterator[str]:
    """The non-empty documents of a .txt (the whole file), .jsonl (one a line) or .parquet file;
    `setting` names the flag or recipe key that sets `text_field`, for the error messages."""
    if file.suffix == ".txt":
        yield file.read_text(encoding="utf-8", errors="replace")
    elif file.suffix == ".jsonl":
        with file.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise LongVAError(f"line {number} of {file} is not valid JSON; fix or remove it.") from None
                if not isinstance(record, dict) or text_field not in record:
                    fields = ", ".join(record) if isinstance(record, dict) else "none"
                    raise LongVAError(f"line {number} of {file} has no {text_field!r} field (it has {fields}); name the text field with {setting}.")
                if record[text_field]:
                    yield str(record[text_field])
    else:
        parquet = parquet_file(file)
        names = parquet.schema_arrow.names
        if text_field not in names:
            raise LongVAError(f"{file} has no {text_field!r} column (it has {', '.join(names)}); name the text field with {setting}.")
        for batch in parquet.iter_batches(columns=[text_field], batch_size=64):
            yield from (str(text) for text in batch.column(0).to_pylist() if text)


def parquet_file(file: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LongVAError("reading .parquet needs pyarrow: `pip install pyarrow`.") from None
    try:
        return pq.ParquetFile(file)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise LongVAError(f"{file} is not a readable parquet file ({type(err).__name__}); replace it or remove it from the data.") from None


def load_saved_dataset(path: Path, split: str, split_setting: str):
    """A `save_to_disk` folder; of a `DatasetDict`, the split `split_setting` names."""
    require_extra("train", ("datasets",), f"reading the dataset in {path}")
    import datasets

    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise LongVAError(f"the dataset in {path} has no split {split!r}; choose one of {', '.join(data)} with {split_setting}.")
        data = data[split]
    return data


def load_hub_dataset(name: str, split: str, source_setting: str, split_setting: str):
    require_extra("train", ("datasets",), f"reading the hub dataset {name}")
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as err:  # offline, unknown name or split, no access: the same advice
        raise LongVAError(
            f"could not load the dataset {name}, split {split}, from the Hugging Face hub ({type(err).__name__}); check the name, "
            f"{split_setting} and your connection, or download it and give the local folder with {source_setting}."
        ) from None


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash that changes whenever the tokenizer would produce different ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{text}|{tokenizer.eos_token_id}".encode()).hexdigest()
