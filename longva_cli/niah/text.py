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

import numpy as np

from longva_cli.errors import LongVAError
from longva_cli.niah.grid import Unit

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


def run_text(settings, *, overwrite: bool = False):
    """Text NIAH over the settings' grid; resumes a folder of the same settings. -> GridRun (rank 0) or None."""
    from longva_cli.niah.settings import check_text, identity

    sizes, depths = check_text(settings)
    if settings.haystack != "synthetic" and not Path(settings.haystack).expanduser().exists():
        raise LongVAError(f"haystack {settings.haystack} does not exist; give a folder of .txt files or `synthetic`.")
    from longva_cli.engine.loader import load
    from longva_cli.engine.sequence import token_sequence
    from longva_cli.engine.sequence_parallel import runner_for
    from longva_cli.niah.grid import check_device_map, score_grid
    from longva_cli.niah.results import prepare_folder
    from longva_cli.niah.scoring import answer_matches, greedy, teacher_forced
    from longva_cli.parallel.ranks import join
    from longva_cli.recipes import to_dict

    ranks = join(settings.sequence_parallel)
    if ranks.is_main:
        prepare_folder(settings.output, "text", to_dict(settings), identity(settings), overwrite)
    ranks.barrier()  # no rank reads the folder before rank 0 has checked (or cleared) it
    check_device_map(ranks, settings.device_map)
    model = load(
        settings.model, kind="causal-lm", device=ranks.device(settings.device), dtype=settings.dtype, attn=settings.attn,
        device_map=settings.device_map, kv_cache=settings.kv_cache,
    )
    tokenizer = model.tokenizer
    numbers, distractor_numbers = run_numbers(settings.seed, settings.samples, settings.distractors)
    haystack = haystack_tokens(tokenizer, settings.haystack, max(sizes))
    prompts = TextNeedlePrompts(tokenizer, haystack, numbers, distractor_numbers, settings.seed)
    runner = runner_for(model.language_model, settings)

    def score(unit: Unit) -> dict:
        answer = str(numbers[unit.index])
        answer_ids = prompts.answers[unit.index]
        teacher = settings.scoring == "teacher-forced"
        sequence = token_sequence(model, prompts.token_ids(unit.size, unit.depth, unit.index, with_answer=teacher))
        if teacher:
            predicted = teacher_forced(runner, sequence, answer_ids)
            text = tokenizer.decode(predicted)
            found = predicted == answer_ids
        else:
            predicted = greedy(model, runner, sequence, settings.max_new_tokens)
            text = tokenizer.decode(predicted, skip_special_tokens=True).strip()
            found = answer_matches(text, answer)
        return {"found": found, "answer": answer, "predicted": text, "answer_ids": answer_ids, "predicted_ids": predicted}

    units = text_units(prompts, sizes, depths, settings.samples)
    title = f"text NIAH {Path(settings.model).name}, {settings.distractors} distractors"
    return score_grid(units, score, settings.output, "text", ranks, title, lambda: runner.forwarded)
