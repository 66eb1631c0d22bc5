"""Training tokens as fixed-length rows of L+1 tokens (L inputs, shifted by one for labels).

Three kinds of source, one interface (`TokenRows`):

- pre-tokenized Hugging Face datasets with an `input_ids` column (a hub name, or a folder
  written by `Dataset.save_to_disk`, or a .parquet file with that column); each row longer
  than L+1 is truncated to its first L+1 tokens, rows shorter are skipped (no packing, no
  document masking: this is how LongVA's 256K-token SlimPajama chunks are used);
- local text (.txt, .jsonl with a text field, .parquet with a text column, or a folder of
  them): tokenized once, documents joined with the EOS token, cut into rows and cached as a
  .npy memmap whose name carries a hash of the content, the tokenizer and the row length;
- `synthetic`: deterministic rows from a random bigram chain, for smoke tests without data.

Each rank reads only the slices of the rows it trains on (arrow and .npy are memory-mapped).
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from pathlib import Path
from typing import Iterator

import numpy as np

from longva_cli.checks import require_extra
from longva_cli.errors import LongVAError

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


class TokenRows:
    """Rows of `row_len` tokens; `read(i, start, stop)` returns tokens [start, stop) of row i."""

    row_len: int
    description: str = ""

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, i: int, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError


class ArrayRows(TokenRows):
    """Rows of a 2-D array, typically a np.load(mmap_mode="r") memmap."""

    def __init__(self, array_2d: np.ndarray, description: str = "") -> None:
        self.array, self.row_len, self.description = array_2d, array_2d.shape[1], description

    def __len__(self) -> int:
        return self.array.shape[0]

    def read(self, i: int, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.array[i, start:stop], dtype=np.int64)


class ArrowRows(TokenRows):
    """Rows of a list-of-ints arrow column, truncated to `row_len`; short rows are skipped."""

    def __init__(self, column, row_len: int, description: str = "") -> None:
        import pyarrow.compute as pc

        self.column = column  # memory-mapped arrow chunks; never combined (that would copy them into RAM)
        lengths = pc.list_value_length(self.column).to_numpy(zero_copy_only=False)
        self.keep = np.flatnonzero(lengths >= row_len)
        self.row_len, self.description = row_len, description
        self.longest = int(lengths.max()) if len(lengths) else 0

    def __len__(self) -> int:
        return len(self.keep)

    def read(self, i: int, start: int, stop: int) -> np.ndarray:
        values = self.column[int(self.keep[i])].values  # zero-copy view of one row
        return values.slice(start, stop - start).to_numpy(zero_copy_only=False).astype(np.int64)


class SyntheticRows(TokenRows):
    """A random bigram chain (each token has two likely successors): learnable, hub-free."""

    def __init__(self, rows: int, row_len: int, vocab_size: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.successors = rng.integers(0, vocab_size, size=(vocab_size, 2))
        self.rows, self.row_len, self.vocab_size, self.seed = rows, row_len, vocab_size, seed
        self.description = f"synthetic bigram chain ({rows} rows, vocabulary {vocab_size})"

    def __len__(self) -> int:
        return self.rows

    def read(self, i: int, start: int, stop: int) -> np.ndarray:
        # always the whole row, so every rank's slice comes from the same stream
        rng = np.random.default_rng([self.seed, i])
        first = rng.integers(0, self.vocab_size)
        choice = rng.integers(0, 2, size=self.row_len)
        tokens = np.empty(self.row_len, dtype=np.int64)
        tokens[0] = first
        for t in range(1, self.row_len):
            tokens[t] = self.successors[tokens[t - 1], choice[t]]
        return tokens[start:stop]


# ---------------------------------------------------------------- opening a source


def is_local(source: str) -> bool:
    """A path (existing or meant to be) rather than a hub dataset name like `org/name`."""
    return (
        Path(source).expanduser().exists()
        or source.startswith((".", "/", "~"))
        or source.endswith(TEXT_SUFFIXES)
        or source.count("/") != 1
    )


def open_rows(
    source: str,
    row_len: int,
    *,
    tokenizer=None,
    column: str = "input_ids",
    text_field: str = "text",
    split: str = "train",
    cache_dir: Path = Path("runs/cache"),
    synthetic_rows: int = 64,
    vocab_size: int = 0,
    seed: int = 0,
    is_main: bool = True,
    barrier=lambda: None,
) -> TokenRows:
    """The rows of `source`, each `row_len` tokens, or a LongVAError saying what is wrong.

    Only the main process tokenizes and writes a cache; the others wait at `barrier` and then
    memory-map the same file.
    """
    if source == "synthetic":
        rows: TokenRows = SyntheticRows(synthetic_rows, row_len, vocab_size, seed)
    elif is_local(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise LongVAError(
                f"data source {source} does not exist; point data.source at a .txt/.jsonl/.parquet file, "
                "a folder of them, a saved datasets folder, or a hub dataset name like org/name."
            )
        if _is_saved_dataset(path) or _parquet_has(path, column):
            rows = _pretokenized(_load_local_dataset(path, split), column, row_len, str(path))
        else:
            rows = _packed_text(path, row_len, tokenizer, text_field, Path(cache_dir), is_main, barrier)
    else:
        rows = _pretokenized(_load_hub_dataset(source, split), column, row_len, source)
    if len(rows) == 0:
        longest = getattr(rows, "longest", None)
        have = f" (the longest row has {longest} tokens)" if longest is not None else ""
        raise LongVAError(
            f"data source {source} has no row of {row_len} tokens (data.seq_len + 1){have}, too short for "
            "one step; add data or lower data.seq_len."
        )
    return rows


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()


def _parquet_has(path: Path, column: str) -> bool:
    files = [path] if path.is_file() else sorted(path.glob("*.parquet"))
    if not files or files[0].suffix != ".parquet":
        return False
    import pyarrow.parquet as pq

    return column in pq.read_schema(files[0]).names


def _load_local_dataset(path: Path, split: str):
    require_extra("train", ("datasets",), f"reading {path}")
    import datasets

    if path.is_dir() and not path.suffix == ".parquet" and _is_saved_dataset(path):
        data = datasets.load_from_disk(str(path))
    else:
        files = [str(path)] if path.is_file() else sorted(map(str, path.glob("*.parquet")))
        data = datasets.load_dataset("parquet", data_files=files, split="train")
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise LongVAError(f"dataset {path} has no split {split}; data.split can be one of {', '.join(data)}.")
        data = data[split]
    return data


def _load_hub_dataset(name: str, split: str):
    require_extra("train", ("datasets",), f"reading the hub dataset {name}")
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as err:  # offline, unknown name, no access: all need the same advice
        raise LongVAError(
            f"could not load the dataset {name} from the Hugging Face hub ({type(err).__name__}); check the name "
            "and your connection, or download it and set data.source to the local folder."
        ) from None


def _pretokenized(data, column: str, row_len: int, name: str) -> TokenRows:
    if column not in data.column_names:
        raise LongVAError(
            f"dataset {name} has no column {column} (it has {', '.join(data.column_names)}); set data.column, "
            "or point data.source at text files to tokenize."
        )
    return ArrowRows(data.data.column(column), row_len, f"{name} (pre-tokenized, {len(data)} rows)")


# ---------------------------------------------------------------- packing local text


def _text_files(path: Path) -> list[Path]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES)
    if not files:
        raise LongVAError(f"no .txt, .jsonl or .parquet files in {path}; add some or point data.source elsewhere.")
    for file in files:
        if file.suffix not in TEXT_SUFFIXES:
            raise LongVAError(f"data file {file} is not .txt, .jsonl or .parquet; convert it or pick another file.")
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


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash that changes whenever the tokenizer would produce different ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{text}|{tokenizer.eos_token_id}".encode()).hexdigest()


def _cache_key(files: list[Path], tokenizer, row_len: int, text_field: str) -> str:
    digest = hashlib.sha256(f"v1|{row_len}|{text_field}|{tokenizer_fingerprint(tokenizer)}".encode())
    for file in files:
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()[:20]


def _packed_text(path: Path, row_len: int, tokenizer, text_field: str, cache_dir: Path, is_main: bool, barrier) -> TokenRows:
    if tokenizer is None:
        raise LongVAError("tokenizing text data needs a tokenizer; set model.tokenizer.")
    files = _text_files(path)
    cache = cache_dir / f"{path.stem}-{row_len}-{_cache_key(files, tokenizer, row_len, text_field)}.npy"
    if is_main and not cache.exists():
        pack_text(files, tokenizer, row_len, text_field, cache)
    barrier()
    return ArrayRows(np.load(cache, mmap_mode="r"), f"{path} (packed, cached in {cache})")


def pack_text(files: list[Path], tokenizer, row_len: int, text_field: str, out: Path) -> Path:
    """Tokenize documents, join them with EOS, cut into rows of `row_len`; save as .npy.

    The tail shorter than a row is dropped. Written to a temporary name and renamed, so an
    interrupted run never leaves a truncated cache behind.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise LongVAError("the tokenizer has no EOS token to separate documents; pick another tokenizer.")
    tokens = array("I")
    for file in files:
        for doc in read_documents(file, text_field, "data.text_field"):
            tokens.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
            tokens.append(eos)
    rows = len(tokens) // row_len
    if rows == 0:
        raise LongVAError(
            f"the text in {files[0] if len(files) == 1 else files[0].parent} makes {len(tokens)} tokens, too short "
            f"for one row of {row_len} (data.seq_len + 1); add text or lower data.seq_len."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, np.frombuffer(tokens, dtype=np.uint32)[: rows * row_len].reshape(rows, row_len))
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------- batches


def row_order(n_rows: int, index: int, seed: int, shuffle: bool) -> int:
    """The row used at position `index` of the (endless) stream: a fresh permutation per epoch."""
    epoch, offset = divmod(index, n_rows)
    if not shuffle:
        return offset
    return int(np.random.default_rng([seed, epoch]).permutation(n_rows)[offset])


def local_batch(rows: TokenRows, row_ids: list[int], ranges: list[tuple[int, int]]):
    """Inputs, labels and global position ids of this rank for the given rows.

    `ranges` are the [start, stop) input positions this rank holds; labels are the same
    positions shifted by one, so each range reads stop - start + 1 tokens.
    """
    import torch

    inputs, labels = [], []
    for i in row_ids:
        parts = [rows.read(i, start, stop + 1) for start, stop in ranges]
        inputs.append(np.concatenate([p[:-1] for p in parts]))
        labels.append(np.concatenate([p[1:] for p in parts]))
    positions = torch.cat([torch.arange(a, b) for a, b in ranges]).unsqueeze(0).expand(len(row_ids), -1)
    return torch.from_numpy(np.stack(inputs)), torch.from_numpy(np.stack(labels)), positions
