"""Reading a letter out of a model's answer, and noticing when the answers are garbage.

Letter extraction: strip the lead-ins models like to write ("The best answer is", "Answer:",
"Option"), then take the first capital A-D that stands alone (not inside a word). A reply that
repeats an option's text word for word picks that option (before any letter search: "A blue
bus" is B's text), and a single lower-case letter ("b") counts too.
The harness that produced the original scores took the first A-D character *anywhere*, so
"At the end, ..." read as A; a standalone letter is the fix.

Degenerate output: a float16 overflow or a wrong chat template makes the model print `!!!!`
or nothing, and the score quietly drops to chance (users saw 23.5 instead of 52.6 on
Video-MME). `DegenerateGuard` counts such answers and trips past a share of them.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field

LETTERS = "ABCDEFGHIJ"

# Lead-ins removed before looking for the letter; applied repeatedly ("Answer: The answer is (B)").
_LEAD_IN = re.compile(
    r"^\s*(?:"
    r"(?:the\s+|my\s+|final\s+)?(?:best|correct|right|final)?\s*(?:answer|option|choice)s?\b\s*(?:is|would be)?\s*[:：\-]?"
    r"|i\s+(?:think|believe|choose|pick|select)\s*(?:that\s+)?(?:it\s+is|it's)?"
    r")\s*",
    re.IGNORECASE,
)
_OPTION_PREFIX = re.compile(r"^\s*\(?([A-J])[.)：:]\s*")
_PUNCTUATION = set(string.punctuation + "。，、！？：；（）…·—–")

# kinds of answer a guard counts as broken
EMPTY = "empty"
PUNCTUATION = "repeated punctuation"
REPEATED = "repeated character"
UNPARSEABLE = "unparseable"

LIKELY_CAUSES = (
    "likely causes: float16 overflow (use --dtype bfloat16 or float32), "
    "a wrong conversation template (LongVA needs qwen_1_5), "
    "or an attention implementation / transformers version mismatch (try --attn sdpa)"
)


def option_text(option: str) -> str:
    """'B. A red car' -> 'A red car'."""
    return _OPTION_PREFIX.sub("", option, count=1).strip()


def _normalise(text: str) -> str:
    return " ".join("".join(" " if c in _PUNCTUATION else c for c in text.lower()).split())


def extract_letter(response: str, options: list[str] | None = None) -> str | None:
    """The option letter a free-form answer picks, or None when it names none.

    `options` (e.g. ["A. red", "B. blue"]) limits the letters to their count and lets a reply
    that repeats an option's text ("blue") count as that option.
    """
    letters = LETTERS[: len(options)] if options else LETTERS[:4]
    text = response.strip()
    if not text:
        return None
    while True:
        shorter = _LEAD_IN.sub("", text, count=1)
        if shorter == text:
            break
        text = shorter
    bare = text.strip(" \t\n.:;,!?()[]{}*'\"")
    if len(bare) == 1 and bare.upper() in letters:
        return bare.upper()
    if options:  # "A blue bus" is option B's text, not the letter A
        said = _normalise(text)
        for letter, option in zip(letters, options):
            if said and said == _normalise(option_text(option)):
                return letter
    standalone = re.search(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z'’])", text)
    return standalone.group(1) if standalone else None


def degenerate_kind(response: str, letter: str | None, multiple_choice: bool = True) -> str | None:
    """Why an answer is broken (EMPTY, PUNCTUATION, REPEATED, UNPARSEABLE), or None when it is fine.

    With `multiple_choice` False (free-form tasks) only empty and junk answers count.
    """
    text = response.strip()
    if not text:
        return EMPTY
    if all(c in _PUNCTUATION or c.isspace() for c in text):
        return PUNCTUATION
    if len(text) >= 4 and len(set(text.replace(" ", ""))) == 1:
        return REPEATED
    if multiple_choice and letter is None:
        return UNPARSEABLE
    return None


@dataclass
class DegenerateGuard:
    """Counts broken answers; `tripped` once their share passes `threshold` after `min_samples`."""

    threshold: float = 0.3
    min_samples: int = 10
    seen: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def add(self, response: str, kind: str | None) -> None:
        self.seen += 1
        if kind:
            self.kinds[kind] = self.kinds.get(kind, 0) + 1
            if len(self.examples) < 3:
                self.examples.append(response[:40])

    @property
    def broken(self) -> int:
        return sum(self.kinds.values())

    @property
    def share(self) -> float:
        return self.broken / self.seen if self.seen else 0.0

    @property
    def tripped(self) -> bool:
        return self.seen >= self.min_samples and self.share > self.threshold

    def message(self) -> str:
        kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(self.kinds.items()))
        shown = ", ".join(repr(example) for example in self.examples)
        return (
            f"{self.broken} of {self.seen} answers ({self.share:.0%}) are degenerate ({kinds}; e.g. {shown}); "
            f"{LIKELY_CAUSES}"
        )

    def to_dict(self) -> dict:
        return {
            "answers": self.seen,
            "degenerate": self.broken,
            "share": round(self.share, 4),
            "kinds": dict(self.kinds),
            "threshold": self.threshold,
            "min_samples": self.min_samples,
            "tripped": self.tripped,
        }
