"""`longva eval ppl`: perplexity on long documents against context length, for any causal LM.

At each context length L of a grid, every document is cut into windows of L tokens advanced by
`stride` (default L: disjoint windows); a window scores only its tokens that no earlier window
scored, as the original's sliding window does (LongVA's `eval_text_ppl.py`, from EasyContext's
`eval_ppl.py`). Each window goes through the engine: chunked prefill into a KV cache and
log-probabilities only at the positions that predict the scored tokens, a few hundred rows of
logits at a time, so a 256K-token window needs no 256K x vocabulary tensor.

Two numbers per (model, L):

- `perplexity`: exp of the mean NLL over every scored token of every document (each token
  weighs the same);
- `window_mean_perplexity`: exp of the mean over windows of each window's mean NLL, which is
  what the original reported (a short last window weighs as much as a full one there).

Where the windows differ from the original: a document's last window ends at the document's
end and starts L tokens before it (the original let it run short, so part of each "L" score
came from a shorter context); documents shorter than L are left out at L (the original scored
them whole, at their own length). A model whose tokenizer adds a start token (Llama's BOS) gets
it before every window, as the original added it; Qwen2 adds none.

The run folder (`RunStore`) holds `settings.json`, `ppl.jsonl` (one line per finished
(model, L), appended at once: a rerun skips them), `ppl.csv` in the original's layout and
`ppl.png`.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import io
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from longva_cli.engine.runs import RunStore, write_atomic
from longva_cli.errors import LongVAError
from longva_cli.eval.settings import PplSettings
from longva_cli.model.config import read_config
from longva_cli.parallel.ranks import join
from longva_cli.text_sources import (
    is_local,
    is_saved_dataset,
    load_hub_dataset,
    load_saved_dataset,
    read_documents,
    text_files,
    tokenizer_fingerprint,
)

if TYPE_CHECKING:
    from rich.progress import Progress

    from longva_cli.engine.loader import TextModel
    from longva_cli.engine.runner import KVRunner

SETTINGS = "settings.json"
RESULTS = "ppl.jsonl"
TABLE = "ppl.csv"
PLOT = "ppl.png"
DATA_HINT = "give a .txt/.jsonl/.parquet file, a folder of them, a saved `datasets` folder or a hub dataset name such as emozilla/pg19-test"


# ---- the grid and the windows --------------------------------------------------------------------


MAX_LENGTHS = 10_000  # context lengths in one grid: far above any real grid, and a list that still fits memory


def context_lengths(min_tokens: int, max_tokens: int, token_step: int | None) -> list[int]:
    """The grid: min_tokens doubling up to max_tokens, or min_tokens, min_tokens + step, ... (as the original)."""
    if min_tokens < 2:
        raise LongVAError(f"--min-tokens must be at least 2 (one token to predict from another), got {min_tokens}.")
    if max_tokens < min_tokens:
        raise LongVAError(f"--max-tokens {max_tokens} is below --min-tokens {min_tokens}; raise it or lower --min-tokens.")
    if token_step is not None:
        if token_step < 1:
            raise LongVAError(f"--token-step must be a positive number of tokens, got {token_step}.")
        if (max_tokens - min_tokens) // token_step + 1 > MAX_LENGTHS:
            raise LongVAError(f"--token-step {token_step} makes more than {MAX_LENGTHS:,} context lengths; take a larger step.")
        return list(range(min_tokens, max_tokens + 1, token_step))
    lengths = [min_tokens]
    while lengths[-1] * 2 <= max_tokens:
        lengths.append(lengths[-1] * 2)
    return lengths


def window_spans(length: int, context: int, stride: int, has_start_token: bool) -> list[tuple[int, int, int]]:
    """(start, stop, first scored) of each window over a `length`-token document (length >= context).

    Windows start every `stride` tokens; the last one ends at the document's end. A window
    scores tokens [first, stop): those no earlier window scored. Without a start token a
    window's first token has nothing before it to predict it from, so it is never scored.
    """
    starts = list(range(0, length - context, stride)) + [length - context]
    spans, scored_until = [], 0
    for start in starts:
        stop = start + context
        spans.append((start, stop, max(scored_until, start if has_start_token else start + 1)))
        scored_until = stop
    return spans


def start_token_ids(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (Llama's BOS; none for Qwen2)."""
    with_special = tokenizer("a", add_special_tokens=True).input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    lead = len(with_special) - len(plain)
    return list(with_special[:lead]) if lead > 0 and with_special[lead:] == plain else []


# ---- scoring -------------------------------------------------------------------------------------


@dataclass
class Measurement:
    """What one (model, L) measured over all documents."""

    nll: float = 0.0  # summed over every scored token
    tokens: int = 0  # tokens scored
    window_means: list[float] = field(default_factory=list)  # each window's mean NLL
    documents: int = 0

    @property
    def perplexity(self) -> float:
        return exp_or_inf(self.nll / self.tokens)

    @property
    def window_mean_perplexity(self) -> float:
        return exp_or_inf(sum(self.window_means) / len(self.window_means))


def exp_or_inf(mean_nll: float) -> float:
    """exp, but inf where a broken model's NLL (a float16 overflow) would raise OverflowError."""
    return math.exp(mean_nll) if mean_nll < math.log(sys.float_info.max) else math.inf


def score_document(
    model: "TextModel",
    runner: "KVRunner",
    tokens: np.ndarray,
    context: int,
    stride: int,
    start_ids: list[int],
    on_event: Callable | None = None,
) -> list[tuple[float, int]]:
    """(summed NLL, tokens scored) of each window of one document; see `window_spans`."""
    from longva_cli.engine.objectives import TeacherForce, drive, run
    from longva_cli.engine.sequence import token_sequence

    lead = np.asarray(start_ids, dtype=np.int64)
    windows = []
    for start, stop, first in window_spans(len(tokens), context, stride, bool(start_ids)):
        ids = np.concatenate([lead, tokens[start:stop].astype(np.int64)])
        targets = ids[len(ids) - (stop - first) :].tolist()
        scored = drive(run(model, runner, token_sequence(model, ids), TeacherForce(targets)), on_event)
        windows.append((-scored.logprob, scored.count))
    return windows


def measure(
    model: "TextModel",
    runner: "KVRunner",
    documents: list[np.ndarray],
    context: int,
    stride: int,
    start_ids: list[int],
    on_event: Callable | None = None,
) -> Measurement:
    """Perplexity at one context length over the documents at least `context` tokens long."""
    result = Measurement()
    for tokens in documents:
        if len(tokens) < context:
            continue
        windows = score_document(model, runner, tokens, context, stride, start_ids, on_event)
        result.documents += 1
        for nll, count in windows:
            result.nll += nll
            result.tokens += count
            result.window_means.append(nll / count)
    return result


def positions_to_run(documents: list[np.ndarray], context: int, stride: int, lead: int) -> int:
    """Positions the runner prefills for one context length (the progress bar's total)."""
    windows = sum(len(window_spans(len(d), context, stride, lead > 0)) for d in documents if len(d) >= context)
    return windows * (context + lead - 1)  # the last position of a window predicts nothing


# ---- data ----------------------------------------------------------------------------------------


@dataclass
class TextSource:
    """Documents to score: `texts()` yields each document's text, `key` names the content."""

    name: str
    key: str  # changes whenever the texts (or the text field) would
    texts: Callable[[], Iterator[str]]


def open_source(source: str, text_field: str, split: str) -> TextSource:
    """The documents of a file or folder of .txt/.jsonl/.parquet, a saved `datasets` folder or a hub dataset."""
    if not is_local(source):
        return dataset_source(source, load_hub_dataset(source, split, "--data", "--split"), text_field, split)
    path = Path(source).expanduser()
    if not path.exists():
        raise LongVAError(f"--data {source} does not exist; {DATA_HINT}.")
    if is_saved_dataset(path):
        return dataset_source(str(path), load_saved_dataset(path, split, "--split"), text_field, split)
    return file_source(path, text_field)


def file_source(path: Path, text_field: str) -> TextSource:
    """.txt: one document per file (a book); .jsonl: one per line; .parquet: one per row."""
    files = text_files(path, "--data", DATA_HINT)
    digest = hashlib.sha256(f"files|{text_field}".encode())
    for file in files:
        digest.update(f"|{file.relative_to(path) if file != path else file.name}|".encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)

    def texts() -> Iterator[str]:
        for file in files:
            yield from read_documents(file, text_field, "--text-field")

    return TextSource(str(path.resolve()), digest.hexdigest()[:20], texts)


def dataset_source(name: str, data, text_field: str, split: str) -> TextSource:
    if text_field not in data.column_names:
        raise LongVAError(f"the dataset {name} has no {text_field!r} column (it has {', '.join(data.column_names)}); name the text field with --text-field.")

    def texts() -> Iterator[str]:
        for batch in data.select_columns([text_field]).iter(batch_size=64):
            yield from (str(text) for text in batch[text_field] if text is not None)

    # datasets fingerprints a dataset by its files and the operations that made it
    return TextSource(name, hashlib.sha256(f"dataset|{data._fingerprint}|{split}|{text_field}".encode()).hexdigest()[:20], texts)


@dataclass
class Documents:
    """The tokenized documents kept (at least min_doc_tokens long, the first `samples` of them)."""

    tokens: list[np.ndarray]  # uint32 token ids, one array per document
    seen: int  # documents read to find them
    longest: int  # tokens in the longest document read, kept or not


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "longva" / "ppl"


# Documents are tokenized in pieces of at most this many characters: within one call a
# tokenizer's memory and time grow faster than the text (one 50 MB line took 9.4 GB and did not
# finish in 600 s); over pieces they grow linearly, and a piece takes about a second.
PIECE_CHARS = 1 << 20
LINE_BREAK = re.compile(r"\S\n(?=\S)")  # one newline between two other characters
WORD_BREAK = re.compile(r"\S (?=\S)")  # one space between two other characters


def text_pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """`text` in consecutive pieces of at most `size` characters, each cut after the last single
    newline between two other characters (else before such a space): byte-level BPE tokenizers
    such as Qwen2's split words there anyway, so the pieces' ids are the whole text's. A piece
    with neither (one endless word) is cut at `size`."""
    start = 0
    while len(text) - start > size:
        window = text[start : start + size]
        cut = _last(LINE_BREAK, window, after=2) or _last(WORD_BREAK, window, after=1) or size
        yield window[:cut]
        start += cut
    yield text[start:]


def _last(pattern: re.Pattern, window: str, after: int) -> int | None:
    """The position `after` characters into the last match of `pattern` in `window`."""
    last = None
    for last in pattern.finditer(window):
        pass
    return None if last is None else last.start() + after


def tokenize_document(tokenizer, text: str) -> np.ndarray:
    """A document's token ids (uint32), tokenized piece by piece (`text_pieces`)."""
    parts = [np.asarray(tokenizer(piece, add_special_tokens=False, verbose=False).input_ids, dtype=np.uint32) for piece in text_pieces(text)]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint32)


def tokenized_documents(
    source: TextSource,
    tokenizer,
    *,
    min_doc_tokens: int,
    samples: int | None,
    cache_dir: Path,
    on_tokens: Callable[[int], None] | None = None,
) -> Documents:
    """The documents' token ids, tokenized once: cached by content, tokenizer and selection.

    Documents are read in order; the first `samples` with at least `min_doc_tokens` tokens are
    kept (as the original filtered, then took the first N), so a large data set is read only as
    far as needed. The cache is written through a temporary file and a rename.
    """
    key = hashlib.sha256(f"ppl-v1|{source.key}|{tokenizer_fingerprint(tokenizer)}|{min_doc_tokens}|{samples}".encode()).hexdigest()[:20]
    cache = Path(cache_dir) / f"{key}.npz"
    if cache.is_file():
        with np.load(cache) as stored:
            offsets = stored["offsets"]
            tokens = [stored["tokens"][start:stop] for start, stop in zip(offsets[:-1], offsets[1:])]
            return Documents(tokens, int(stored["seen"]), int(stored["longest"]))
    kept: list[np.ndarray] = []
    seen = longest = 0
    for text in source.texts():
        if samples is not None and len(kept) >= samples:
            break
        ids = tokenize_document(tokenizer, text)
        seen += 1
        longest = max(longest, len(ids))
        if on_tokens:
            on_tokens(len(ids))
        if len(ids) and len(ids) >= min_doc_tokens:
            kept.append(ids)
    cache.parent.mkdir(parents=True, exist_ok=True)
    temporary = cache.with_name(f".{cache.stem}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        offsets = np.cumsum([0] + [len(ids) for ids in kept])
        flat = np.concatenate(kept) if kept else np.empty(0, dtype=np.uint32)
        np.savez(handle, tokens=flat, offsets=offsets, seen=seen, longest=longest)
    os.replace(temporary, cache)
    return Documents(kept, seen, longest)


def check_documents(documents: Documents, lengths: list[int], settings: PplSettings, model: str) -> list[int]:
    """The context lengths some kept document is long enough for; a LongVAError when there is none."""
    if documents.longest == 0:
        raise LongVAError(f"--data {settings.data} holds no text; {DATA_HINT}, with text in field {settings.text_field!r}.")
    tokenizer_note = f"with {model}'s tokenizer"
    if not documents.tokens:
        raise LongVAError(
            f"no document of --data {settings.data} has --min-doc-tokens {settings.min_doc_tokens:,} tokens (the longest has "
            f"{documents.longest:,} {tokenizer_note}); lower --min-doc-tokens or give longer documents."
        )
    longest = max(len(tokens) for tokens in documents.tokens)
    usable = [length for length in lengths if length <= longest]
    if not usable:
        raise LongVAError(
            f"every document of --data {settings.data} is shorter than the smallest context length {lengths[0]:,} (the longest has "
            f"{longest:,} tokens {tokenizer_note}); lower --min-tokens or give longer documents."
        )
    return usable


# ---- the run -------------------------------------------------------------------------------------


@dataclass
class PplRun:
    """What a finished run reports (the main rank only)."""

    folder: Path
    records: list[dict]  # every (model, L) line of ppl.jsonl, this run's and earlier ones
    scored_now: list[tuple[str, int]]  # (model, L) measured by this call
    plot_note: str | None = None  # why ppl.png was not drawn


@dataclass
class PreparedModel:
    name: str
    folder: Path
    documents: Documents
    lengths: list[int]  # the grid's lengths some document reaches
    start_ids: list[int]
    max_positions: int | None


def run_folder(settings: PplSettings) -> Path:
    """--output, or runs/ppl-<data name>: runs on other data never meet in one folder by default."""
    if settings.output is not None:
        return Path(settings.output)
    return Path("runs") / f"ppl-{Path(settings.data.rstrip('/')).stem or 'data'}"


def identity(settings: PplSettings, source: TextSource) -> dict:
    """What the numbers depend on besides the model and L: another value needs --overwrite."""
    return {
        "data": source.name, "data_key": source.key, "min_doc_tokens": settings.min_doc_tokens, "samples": settings.samples,
        "stride": settings.stride,
    }


def check_settings(settings: PplSettings) -> list[int]:
    """The grid; a LongVAError for impossible numbers, before anything is read or loaded."""
    if not settings.models:
        raise LongVAError("give at least one --model (a causal LM folder, hub id or LongVA checkpoint).")
    if len(set(settings.models)) != len(settings.models):
        raise LongVAError("a --model is given twice; give each model once.")
    lengths = context_lengths(settings.min_tokens, settings.max_tokens, settings.token_step)
    if settings.stride is not None and not 1 <= settings.stride <= lengths[0]:
        raise LongVAError(
            f"--stride must be between 1 and the smallest context length {lengths[0]:,} (a longer one would skip tokens), got {settings.stride}."
        )
    if settings.samples is not None and settings.samples < 1:
        raise LongVAError(f"--samples must be at least 1, got {settings.samples}.")
    if settings.min_doc_tokens < 0:
        raise LongVAError(f"--min-doc-tokens cannot be negative, got {settings.min_doc_tokens}.")
    if settings.prefill_chunk < 1:
        raise LongVAError(f"--prefill-chunk must be at least 1, got {settings.prefill_chunk}.")
    if settings.sequence_parallel < 1:
        raise LongVAError(f"--sequence-parallel must be at least 1, got {settings.sequence_parallel}.")
    if settings.sequence_parallel > 1 and settings.device_map is not None:
        raise LongVAError("--device-map auto and --sequence-parallel are two ways to spread one sequence; choose one.")
    from longva_cli.model.kv_cache import check_kv_cache

    check_kv_cache(settings.kv_cache, settings.sequence_parallel)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != settings.sequence_parallel:
        # every rank scores every window together; ranks working apart would only repeat each other
        raise LongVAError(
            f"{world} processes were launched for --sequence-parallel {settings.sequence_parallel}: several processes split each "
            f"window, so launch exactly that many (`torchrun --nproc-per-node N -m longva_cli eval ppl --sequence-parallel N ...`)."
        )
    return lengths


def prepare_models(
    settings: PplSettings, source: TextSource, lengths: list[int], on_warning: Callable[[str], None], progress: "Progress | None"
) -> list[PreparedModel]:
    """Each model's folder, tokenizer and tokenized documents, checked before any weights load."""
    from longva_cli.hub import locate_model
    from longva_cli.model.checkpoint import load_tokenizer

    prepared = []
    by_tokenizer: dict[str, Documents] = {}
    for name in settings.models:
        folder = locate_model(name, revision=settings.revision, kind="causal-lm")
        tokenizer = load_tokenizer(folder)
        fingerprint = tokenizer_fingerprint(tokenizer)
        if fingerprint not in by_tokenizer:
            task = progress.add_task(f"tokenizing for {short_name(name)}", total=None) if progress else None
            by_tokenizer[fingerprint] = tokenized_documents(
                source, tokenizer, min_doc_tokens=settings.min_doc_tokens, samples=settings.samples,
                cache_dir=settings.cache_dir or default_cache_dir(),
                on_tokens=(lambda count, task=task: progress.advance(task, count)) if progress else None,
            )
            if progress:
                progress.remove_task(task)
        documents = by_tokenizer[fingerprint]
        usable = check_documents(documents, lengths, settings, name)
        longest = max(len(tokens) for tokens in documents.tokens)
        if len(usable) < len(lengths):
            skipped = ", ".join(f"{length:,}" for length in lengths[len(usable) :])
            on_warning(f"{name}: no document reaches {skipped} tokens (the longest has {longest:,}); those lengths are left out.")
        short = [length for length in usable if any(len(tokens) < length for tokens in documents.tokens)]
        if short:
            on_warning(
                f"{name}: at {', '.join(f'{length:,}' for length in short)} tokens some of the {len(documents.tokens)} documents are "
                f"shorter and are left out there (ppl.jsonl counts them); --min-doc-tokens {usable[-1]} scores the same documents everywhere."
            )
        config = read_config(folder)
        max_positions = config.get("max_position_embeddings") or config.get("text_config", {}).get("max_position_embeddings")
        beyond = [length for length in usable if max_positions and length > max_positions]
        if beyond:
            on_warning(
                f"{name}: {', '.join(f'{length:,}' for length in beyond)} tokens are beyond its max_position_embeddings "
                f"({max_positions:,}); measured anyway, which is what the curve is for."
            )
        prepared.append(PreparedModel(name, folder, documents, usable, start_token_ids(tokenizer), max_positions))
    return prepared


def evaluate_perplexity(
    settings: PplSettings,
    *,
    overwrite: bool = False,
    on_warning: Callable[[str], None] = lambda message: None,
    progress: "Progress | None" = None,
) -> PplRun | None:
    """Measure every (model, L) not yet in the run folder; write ppl.jsonl, ppl.csv and ppl.png.

    Returns the run's records on the main rank (None on the other sequence-parallel ranks).
    """
    lengths = check_settings(settings)
    source = open_source(settings.data, settings.text_field, settings.split)
    if next(iter(source.texts()), None) is None:  # also checks the text field before any model is fetched
        raise LongVAError(f"--data {settings.data} holds no documents; {DATA_HINT}, with text in field {settings.text_field!r}.")
    ranks = join(settings.sequence_parallel)
    try:
        main = ranks.is_main  # the other ranks of a sequence-parallel group compute the same, silently
        prepared = prepare_models(settings, source, lengths, on_warning if main else lambda message: None, progress if main else None)
        folder = run_folder(settings)
        store = RunStore(folder, SETTINGS, fields={RESULTS: ("model", "context_length", "perplexity")})
        if main:
            store.open(identity(settings, source), overwrite=overwrite, results=(RESULTS, TABLE, PLOT), settings=settings_record(settings))
        ranks.barrier()  # no rank reads the folder before the main rank has checked (or cleared) it
        done = {(record["model"], record["context_length"]) for record in store.read(RESULTS)}
        scored_now = []
        for entry in prepared:
            todo = [length for length in entry.lengths if (entry.name, length) not in done]
            if not todo:
                continue
            model, runner = load_for_scoring(entry, settings, ranks)
            for length in todo:
                record = measure_length(model, runner, entry, length, settings, progress if main else None)
                if main:
                    store.append(RESULTS, record)
                    write_table(folder, store.read(RESULTS))
                scored_now.append((entry.name, length))
            del model, runner
            release_memory()
    finally:
        ranks.close()
    if not ranks.is_main:
        return None
    records = store.read(RESULTS)
    write_table(folder, records)
    from longva_cli.eval.ppl_plot import INSTALL_HINT, draw_curves, plotting_available

    plot_note = None
    if not plotting_available():
        plot_note = INSTALL_HINT
    elif records:
        draw_curves(*curves(records), folder / PLOT)
    return PplRun(folder, records, scored_now, plot_note)


def load_for_scoring(entry: PreparedModel, settings: PplSettings, ranks) -> tuple["TextModel", "KVRunner"]:
    from longva_cli.engine.loader import load
    from longva_cli.engine.sequence_parallel import runner_for

    model = load(
        str(entry.folder), kind="causal-lm", device=ranks.device(settings.device), dtype=settings.dtype, attn=settings.attn,
        device_map=settings.device_map, kv_cache=settings.kv_cache,
    )
    return model, runner_for(model.language_model, settings)


def measure_length(model, runner, entry: PreparedModel, length: int, settings: PplSettings, progress: "Progress | None") -> dict:
    """One (model, L): its ppl.jsonl record."""
    from longva_cli.model.kv_cache import kv_storage_of

    stride = settings.stride or length
    task = None
    total = positions_to_run(entry.documents.tokens, length, stride, len(entry.start_ids))
    if progress is not None:
        task = progress.add_task(f"{short_name(entry.name)} L={length:,}", total=total)
    forwarded_before = runner.forwarded

    def on_event(event) -> None:
        if task is not None:
            progress.update(task, completed=runner.forwarded - forwarded_before)

    started = time.perf_counter()
    result = measure(model, runner, entry.documents.tokens, length, stride, entry.start_ids, on_event)
    seconds = time.perf_counter() - started
    forwarded = runner.forwarded - forwarded_before
    if task is not None:
        progress.update(task, completed=total)
        progress.stop_task(task)
    return {
        "model": entry.name,
        "context_length": length,
        "perplexity": result.perplexity,
        "window_mean_perplexity": result.window_mean_perplexity,
        "mean_nll": result.nll / result.tokens,
        "tokens_scored": result.tokens,
        "windows": len(result.window_means),
        "documents": result.documents,
        "stride": stride,
        "start_tokens": len(entry.start_ids),
        "beyond_max_position_embeddings": bool(entry.max_positions and length > entry.max_positions),
        "seconds": round(seconds, 3),
        "tokens_forwarded": forwarded,
        "tokens_per_s": round(forwarded / seconds, 1) if seconds > 0 else None,
        "dtype": str(model.language_model.dtype).removeprefix("torch."),
        "attention": model.language_model.config._attn_implementation,
        "kv_cache": str(kv_storage_of(model.language_model)).removeprefix("torch."),
    }


def release_memory() -> None:
    """Free a model before the next one loads (GPU memory is not returned on `del` alone)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def settings_record(settings: PplSettings) -> dict:
    from dataclasses import asdict

    return {key: (str(value) if isinstance(value, Path) else value) for key, value in asdict(settings).items()}


def short_name(model: str) -> str:
    return Path(model.rstrip("/")).name or model


# ---- outputs -------------------------------------------------------------------------------------


def curves(records: list[dict], key: str = "perplexity") -> tuple[list[int], dict[str, list[float | None]]]:
    """(context lengths, {model: perplexity at each length or None}) from ppl.jsonl records, models in first-seen order."""
    first: dict[tuple[str, int], dict] = {}
    for record in records:
        first.setdefault((record["model"], record["context_length"]), record)
    lengths = sorted({length for _, length in first})
    models = list(dict.fromkeys(model for model, _ in first))
    return lengths, {model: [first[(model, length)][key] if (model, length) in first else None for length in lengths] for model in models}


def csv_text(lengths: list[int], rows: dict[str, list[float | None]]) -> str:
    """The original's layout: a header `,L1,L2,...`, then `model,ppl1,ppl2,...` (empty where not measured)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([""] + lengths)
    for model, values in rows.items():
        writer.writerow([model] + ["" if value is None else repr(value) for value in values])
    return buffer.getvalue()


def write_table(folder: Path, records: list[dict]) -> None:
    if records:
        write_atomic(Path(folder) / TABLE, csv_text(*curves(records)))


def read_table(path: Path) -> tuple[list[int], dict[str, list[float | None]]]:
    """A ppl.csv (ours or the original's) back into (lengths, {model: values})."""
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8").splitlines()))
        lengths = [int(float(cell)) for cell in rows[0][1:]]
        table = {row[0]: [float(cell) if cell.strip() else None for cell in row[1 : len(lengths) + 1]] for row in rows[1:] if row}
    except (IndexError, ValueError):
        raise LongVAError(f"{path} is not a perplexity table (a header `,L1,L2,...` then `model,ppl,...` rows); rerun `longva eval ppl` to write it.") from None
    if not lengths or not table:
        raise LongVAError(f"{path} holds no perplexities; rerun `longva eval ppl` to write them.")
    return lengths, table
