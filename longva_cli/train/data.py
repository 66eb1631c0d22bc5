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
import os
from array import array
from pathlib import Path

import numpy as np

from longva_cli.checks import require_extra
from longva_cli.errors import LongVAError
from longva_cli.text_sources import (
    is_local,
    is_saved_dataset,
    load_hub_dataset,
    load_saved_dataset,
    read_documents,
    text_files,
    tokenizer_fingerprint,
)

DATA_HINT = "point data.source at a .txt/.jsonl/.parquet file, a folder of them, a saved datasets folder, or a hub dataset name like org/name"


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
            raise LongVAError(f"data source {source} does not exist; {DATA_HINT}.")
        if is_saved_dataset(path) or _parquet_has(path, column):
            rows = _pretokenized(_load_local_dataset(path, split), column, row_len, str(path))
        else:
            rows = _packed_text(path, row_len, tokenizer, text_field, Path(cache_dir), is_main, barrier)
    else:
        rows = _pretokenized(load_hub_dataset(source, split, "data.source", "data.split"), column, row_len, source)
    if len(rows) == 0:
        longest = getattr(rows, "longest", None)
        have = f" (the longest row has {longest} tokens)" if longest is not None else ""
        raise LongVAError(
            f"data source {source} has no row of {row_len} tokens (data.seq_len + 1){have}, too short for "
            "one step; add data or lower data.seq_len."
        )
    return rows


def _parquet_has(path: Path, column: str) -> bool:
    files = [path] if path.is_file() else sorted(path.glob("*.parquet"))
    if not files or files[0].suffix != ".parquet":
        return False
    import pyarrow.parquet as pq

    return column in pq.read_schema(files[0]).names


def _load_local_dataset(path: Path, split: str):
    if path.suffix != ".parquet" and is_saved_dataset(path):
        return load_saved_dataset(path, split, "data.split")
    require_extra("train", ("datasets",), f"reading {path}")
    import datasets

    files = [str(path)] if path.is_file() else sorted(map(str, path.glob("*.parquet")))
    return datasets.load_dataset("parquet", data_files=files, split="train")


def _pretokenized(data, column: str, row_len: int, name: str) -> TokenRows:
    if column not in data.column_names:
        raise LongVAError(
            f"dataset {name} has no column {column} (it has {', '.join(data.column_names)}); set data.column, "
            "or point data.source at text files to tokenize."
        )
    return ArrowRows(data.data.column(column), row_len, f"{name} (pre-tokenized, {len(data)} rows)")


# ---------------------------------------------------------------- packing local text


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
    files = text_files(path, "data.source", DATA_HINT)
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
