"""Text NIAH: a 7-digit "special magic Singapore number" hidden in a long book.

    This is a very long story book: <book> haystack[0:L] with the needle (and distractors)
    </book>.\\n Based on the content of the book, Question: ... Answer: The special magic Singapore number is: <digits>

The needle goes after the first sentence end at or past `int(L * depth)` (depth 0: at the
very start), found from the tokens' text containing '.': the original looked for Llama's
period token ids (29889, 869), which are other tokens in Qwen2's vocabulary, so with Qwen2 the
needle landed after whichever of those came next, usually mid-sentence. Distractors (other cities' numbers) go after the
sentence end following a random position, seeded per (cell, sample), so a rerun builds the
same sequences.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from longva_cli.errors import LongVAError
from longva_cli.niah.grid import Unit

if TYPE_CHECKING:  # torch loads only once a run starts: bad input fails fast
    from longva_cli.model.prefix_cache import Sequence

NEEDLE = "\nThe special magic Singapore number is: {}.\n"
CITIES = ["New York", "London", "Paris", "Tokyo", "Beijing", "Berlin"]
DISTRACTOR = "\nThe special magic {} number is: {}.\n"
PREFIX = "This is a very long story book: <book>"
QUESTION = (
    "</book>.\n Based on the content of the book, Question: What is the special magic Singapore number? "
    "Answer: The special magic Singapore number is: "
)

# The built-in haystack: plain sentences with no numbers, shuffled into paragraphs.
_FILLER = [
    "The river bends twice before it reaches the old mill.",
    "In spring the orchards on the hill turn white with blossom.",
    "A ferry crosses the bay every hour, even when the fog is thick.",
    "The library keeps its oldest maps in a cool room under the stairs.",
    "Children fly kites on the common when the wind comes from the west.",
    "The baker opens before sunrise and sells out of rye bread by noon.",
    "Along the coast, lighthouses once guided fishing boats home at night.",
    "The market square fills with stalls of cheese, honey and apples on Saturdays.",
    "An old clock in the station tower has not kept the right time for years.",
    "Hikers follow the ridge path to see the valley spread out below.",
    "The choir practises in the chapel on Thursday evenings.",
    "Snow rarely settles in the town, but the mountains stay white all winter.",
    "A narrow lane leads from the harbour to the church on the cliff.",
    "The museum shows tools that farmers used long before engines.",
    "Swallows nest under the bridge and leave again at the end of summer.",
    "The tea house by the lake serves cakes on blue and white plates.",
]


def synthetic_haystack(seed: int = 0, sentences: int = 4000) -> str:
    """Paragraphs of shuffled filler sentences (no digits, so no accidental needle)."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(_FILLER), sentences)
    paragraphs = [" ".join(_FILLER[i] for i in picks[start : start + 8]) for start in range(0, sentences, 8)]
    return "\n\n".join(paragraphs)


def haystack_tokens(tokenizer, source: str, count: int) -> np.ndarray:
    """At least `count` token ids of the haystack: the .txt files (sorted) repeated as often as needed."""
    if source == "synthetic":
        texts = [synthetic_haystack()]
    else:
        folder = Path(source).expanduser()
        if not folder.exists():
            raise LongVAError(f"haystack {source} does not exist; give a folder of .txt files or `synthetic`.")
        files = sorted(folder.glob("*.txt")) if folder.is_dir() else [folder]
        if not files:
            raise LongVAError(f"haystack folder {folder} has no .txt files; add some text or use --haystack synthetic.")
        texts = [file.read_text(encoding="utf-8", errors="replace") for file in files]
    ids = np.concatenate([np.asarray(tokenize(tokenizer, text), dtype=np.int64) for text in texts])
    if len(ids) == 0:
        raise LongVAError(f"haystack {source} is empty; give text files with content.")
    return np.tile(ids, math.ceil(count / len(ids)))[:count]


def tokenize(tokenizer, text: str, special: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=special, verbose=False).input_ids


def sentence_end_ids(tokenizer, *token_arrays: np.ndarray) -> np.ndarray:
    """The ids, among those used, whose text contains a full stop (works for any tokenizer)."""
    used = np.unique(np.concatenate(token_arrays))
    return np.array([i for i in used.tolist() if "." in tokenizer.decode([i])], dtype=np.int64)


def insertion_point(tokens: np.ndarray, start: int, sentence_ends: np.ndarray) -> int:
    """Just after the first sentence end at or past `start`; `start` itself when there is none."""
    hits = np.flatnonzero(np.isin(tokens[start:], sentence_ends))
    return start + int(hits[0]) + 1 if len(hits) else start


def needle_position(haystack: np.ndarray, depth: float, sentence_ends: np.ndarray) -> int:
    if depth == 0:
        return 0
    return insertion_point(haystack, int(len(haystack) * depth), sentence_ends)


class TextNeedlePrompts:
    """Token sequences of every (length, depth, sample), built from one tokenized haystack."""

    def __init__(self, tokenizer, haystack: np.ndarray, numbers: list[int], distractor_numbers: list[int], seed: int) -> None:
        self.haystack = haystack
        self.seed = seed
        self.prefix = np.asarray(tokenize(tokenizer, PREFIX, special=True), dtype=np.int64)  # keeps a BOS, as the original
        self.question = np.asarray(tokenize(tokenizer, QUESTION), dtype=np.int64)
        self.numbers = numbers
        self.needles = [np.asarray(tokenize(tokenizer, NEEDLE.format(n)), dtype=np.int64) for n in numbers]
        self.answers = [tokenize(tokenizer, str(n)) for n in numbers]
        self.distractors = [
            np.asarray(tokenize(tokenizer, DISTRACTOR.format(city, n)), dtype=np.int64)
            for city, n in zip(CITIES, distractor_numbers)
        ]
        self.sentence_ends = sentence_end_ids(tokenizer, haystack, *self.needles, *self.distractors)

    def book(self, length: int, depth: float, sample: int) -> tuple[np.ndarray, int]:
        """The haystack's first `length` tokens with the needle and distractors; and the needle's position."""
        haystack = self.haystack[:length]
        at = needle_position(haystack, depth, self.sentence_ends)
        book = np.concatenate([haystack[:at], self.needles[sample], haystack[at:]])
        rng = np.random.default_rng([self.seed, length, round(depth * 1_000_000), sample])
        for distractor in self.distractors:
            where = insertion_point(book, int(rng.integers(0, len(book))), self.sentence_ends)
            book = np.concatenate([book[:where], distractor, book[where:]])
            at += len(distractor) if where <= at else 0
        return book, at

    def token_ids(self, length: int, depth: float, sample: int, with_answer: bool) -> np.ndarray:
        book, _ = self.book(length, depth, sample)
        parts = [self.prefix, book, self.question] + ([np.asarray(self.answers[sample], dtype=np.int64)] if with_answer else [])
        return np.concatenate(parts)


def token_sequence(language_model, ids: np.ndarray) -> Sequence:
    """A text sequence: keys are the token ids, embeddings looked up slice by slice."""
    import torch

    from longva_cli.model.prefix_cache import Sequence

    embedding = language_model.get_input_embeddings()
    device = embedding.weight.device

    def embed(start: int, stop: int):
        return embedding(torch.from_numpy(ids[start:stop]).to(device))

    return Sequence(ids, embed)


def text_units(prompts: TextNeedlePrompts, sizes: list[int], depths: list[float], samples: int) -> list[Unit]:
    """Ordered by needle position, then sample, then length: neighbours share the longest prefix."""
    units = []
    for length in sizes:
        for depth in depths:
            at = needle_position(prompts.haystack[:length], depth, prompts.sentence_ends)
            units += [Unit(length, depth, sample, order=(at, sample, length)) for sample in range(samples)]
    return units


def run_numbers(seed: int, samples: int, distractors: int) -> tuple[list[int], list[int]]:
    """The run's needle numbers (one per sample, the same in every cell, as the original) and distractor numbers.

    Always 7 digits: the original drew from [0, 10^7), so some of its "7-digit" numbers were shorter.
    """
    rng = np.random.default_rng(seed)
    return rng.integers(10**6, 10**7, samples).tolist(), rng.integers(10**6, 10**7, distractors).tolist()


def load_text_model(name: str, device: str, dtype: str, attn: str, device_map: str | None = None):
    """(causal LM, tokenizer) from a folder or hub id (cached, or downloaded).

    `device_map="auto"` spreads the layers (and so the KV cache) over the visible GPUs.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longva_cli.model.longva import resolve_attention, resolve_device, resolve_dtype

    if device_map not in (None, "auto"):
        raise LongVAError(f"--device-map {device_map!r} is not supported; use auto (split across the visible GPUs).")
    target = resolve_device(device) if device_map is None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    folder = text_model_folder(name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=resolve_dtype(dtype, target),
        attn_implementation=resolve_attention(attn, target),
        device_map=device_map if device_map is not None else target,
    )
    return model.eval(), tokenizer


def text_model_folder(name: str) -> Path:
    import os

    from longva_cli import hub

    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LongVAError(f"{path} has no config.json; give a Hugging Face model folder or a hub id.")
        return path
    if name.startswith((".", "/", "~")):
        raise LongVAError(f"model folder {path} does not exist; give a model folder or a hub id such as lmms-lab/Qwen2-7B-Instrcuct-224K.")
    folder = hub.cached(name)
    if folder is not None:
        return folder
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise LongVAError(f"{name} is not downloaded and HF_HUB_OFFLINE is set; run `longva download {name}` with network access.")
    return hub.download(name)


def stop_ids(tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")}
    return {i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id}


def run_text(settings, *, overwrite: bool = False):
    """Text NIAH over the settings' grid; resumes a folder of the same settings. -> GridRun (rank 0) or None."""
    from longva_cli.niah.settings import check_text, identity

    sizes, depths = check_text(settings)
    if settings.haystack != "synthetic" and not Path(settings.haystack).expanduser().exists():
        raise LongVAError(f"haystack {settings.haystack} does not exist; give a folder of .txt files or `synthetic`.")
    from longva_cli.niah.grid import Ranks, score_grid
    from longva_cli.niah.results import prepare_folder
    from longva_cli.model.prefix_cache import PrefixCache
    from longva_cli.niah.scoring import answer_matches, greedy, teacher_forced
    from longva_cli.recipes import to_dict

    ranks = Ranks(settings.sequence_parallel)
    if ranks.main:
        prepare_folder(settings.output, "text", to_dict(settings), identity(settings), overwrite)
    ranks.barrier()  # no rank reads the folder before rank 0 has checked (or cleared) it
    ranks.check_device_map(settings.device_map)
    model, tokenizer = load_text_model(settings.model, ranks.device(settings.device), settings.dtype, settings.attn, settings.device_map)
    numbers, distractor_numbers = run_numbers(settings.seed, settings.samples, settings.distractors)
    haystack = haystack_tokens(tokenizer, settings.haystack, max(sizes))
    prompts = TextNeedlePrompts(tokenizer, haystack, numbers, distractor_numbers, settings.seed)
    if settings.sequence_parallel > 1:
        from longva_cli.niah.sharded import sharded_forward

        cache = sharded_forward(model, settings.sequence_parallel)
    else:
        cache = PrefixCache(model, settings.prefill_chunk)
    stops = stop_ids(tokenizer)

    def score(unit: Unit) -> dict:
        answer = str(numbers[unit.index])
        answer_ids = prompts.answers[unit.index]
        teacher = settings.scoring == "teacher-forced"
        ids = prompts.token_ids(unit.size, unit.depth, unit.index, with_answer=teacher)
        if teacher:
            predicted = teacher_forced(cache, token_sequence(model, ids), answer_ids)
            text = tokenizer.decode(predicted)
            found = predicted == answer_ids
        else:
            predicted = greedy(cache, token_sequence(model, ids), stops, settings.max_new_tokens)
            text = tokenizer.decode(predicted, skip_special_tokens=True).strip()
            found = answer_matches(text, answer)
        return {"found": found, "answer": answer, "predicted": text, "answer_ids": answer_ids, "predicted_ids": predicted}

    units = text_units(prompts, sizes, depths, settings.samples)
    title = f"text NIAH {Path(settings.model).name}, {settings.distractors} distractors"
    return score_grid(units, score, settings.output, "text", ranks, title, lambda: cache.forwarded)
