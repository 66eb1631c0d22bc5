"""One input sequence for the language model: text and visual tokens spliced in order.

Every command builds its prompt the same way: a list of parts (text, token ids, visual tokens)
laid end to end. The result is a `Sequence`: a key per position and a way to embed any slice,
so a long video's embeddings are never copied into one [seq, d] tensor unless asked for.

Keys say which positions are equal: a text position's key is its token id; a visual position's
key is negative, derived from what the visual tokens show (the media's content and how it was
preprocessed) and the token's index within them. Equal keys at equal positions mean equal
embeddings, hence equal keys and values in every layer: that is what lets a KV cache be reused
across prompts, requests and conversations (see `runner.PrefixCache`).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, Union

import numpy as np
import torch

from longva_cli.errors import LongVAError
from longva_cli.model.prompt import IMAGE_PLACEHOLDER

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# A visual token's key is -(1 + identity * VISUAL_SPAN + index): 2^22 tokens (29,000 frames)
# per media item, 2^40 identities, all far from any token id (which are >= 0).
VISUAL_SPAN = 1 << 22
IDENTITY_BITS = 40


def identity_of(*parts: object) -> int:
    """A 40-bit number naming some content (e.g. a file hash and its preprocessing)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:5], "big")


@dataclass
class Visual:
    """Visual tokens of one media item, in the order they enter the prompt."""

    embeds: torch.Tensor  # [images * 144, d]
    kind: str  # "video" or "image"
    images: int  # frames of a video, crops of an image
    frame_ids: list[int] = field(default_factory=list)
    grid: tuple[int, int] | None = None  # (w, h) of the UniRes canvas, images only
    # What the tokens show; visuals of equal identity have equal embeddings. A random one
    # (the default) never matches another, so nothing is reused by mistake.
    identity: int = field(default_factory=lambda: uuid.uuid4().int >> (128 - IDENTITY_BITS))
    offset: int = 0  # index of the first token within the media's tokens (slices)

    def __len__(self) -> int:
        return len(self.embeds)

    def keys(self) -> np.ndarray:
        first = 1 + self.identity * VISUAL_SPAN + self.offset
        return -np.arange(first, first + len(self.embeds), dtype=np.int64)

    def slice(self, start: int, stop: int) -> "Visual":
        """Tokens [start, stop) as a Visual whose keys are those tokens' keys in the whole."""
        return Visual(self.embeds[start:stop], self.kind, self.images, identity=self.identity, offset=self.offset + start)


class Embedder(Protocol):
    """What `build` needs of a model: its tokenizer and its token-embedding lookup."""

    tokenizer: "PreTrainedTokenizerBase"

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor: ...


Part = Union[str, np.ndarray, torch.Tensor, Visual]  # text | token ids | token ids | visual tokens


@dataclass
class Sequence:
    """One input sequence: a key per position and a way to embed any slice of it."""

    keys: np.ndarray  # [seq] int64
    embed: Callable[[int, int], torch.Tensor]  # (start, stop) -> [stop - start, d]

    def __len__(self) -> int:
        return len(self.keys)


def tokenize(tokenizer, text: str) -> np.ndarray:
    """Token ids of `text` on its own, without special tokens (Qwen2 adds no BOS anyway)."""
    return np.asarray(tokenizer(text, add_special_tokens=False, verbose=False).input_ids, dtype=np.int64)


def build(model: Embedder, parts: list[Part]) -> Sequence:
    """The sequence of `parts` laid end to end (text is tokenized piece by piece, as the original does).

    Token embeddings are looked up once here; visual embeddings are referenced, not copied.
    """
    pieces: list[tuple[np.ndarray, torch.Tensor]] = []
    for part in parts:
        if isinstance(part, Visual):
            pieces.append((part.keys(), part.embeds))
            continue
        ids = tokenize(model.tokenizer, part) if isinstance(part, str) else np.asarray(part, dtype=np.int64)
        if len(ids):
            pieces.append((ids, model.embed_tokens(torch.from_numpy(ids))))
    return laid_end_to_end([p for p in pieces if len(p[0])])


def laid_end_to_end(pieces: list[tuple[np.ndarray, torch.Tensor]]) -> Sequence:
    """A sequence made of (keys [n], embeddings [n, d]) pieces, embedded slice by slice without a copy."""
    if not pieces:
        raise LongVAError("the prompt is empty; give a question or some text.")
    keys = np.concatenate([k for k, _ in pieces])
    bounds = np.cumsum([0] + [len(k) for k, _ in pieces])
    device = pieces[0][1].device

    def embed(start: int, stop: int) -> torch.Tensor:
        parts = []
        for (_, embeds), lo, hi in zip(pieces, bounds[:-1], bounds[1:]):
            if hi > start and lo < stop:
                parts.append(embeds[max(start, lo) - lo : min(stop, hi) - lo].to(device))
        return torch.cat(parts)

    return Sequence(keys, embed)


def prompt_parts(prompt: str, visuals: list[Visual]) -> list[Part]:
    """A chat prompt cut at each `<image>`, each placeholder replaced by its media's tokens."""
    texts = prompt.split(IMAGE_PLACEHOLDER)
    if len(texts) != len(visuals) + 1:
        raise LongVAError(f"the prompt has {len(texts) - 1} <image> placeholders for {len(visuals)} media items.")
    parts: list[Part] = [texts[0]]
    for visual, text in zip(visuals, texts[1:]):
        parts += [visual, text]
    return parts


def token_sequence(model: Embedder, ids: np.ndarray) -> Sequence:
    """A text-only sequence of known token ids, embedded lazily slice by slice (long haystacks)."""

    def embed(start: int, stop: int) -> torch.Tensor:
        return model.embed_tokens(torch.from_numpy(ids[start:stop]))

    return Sequence(np.asarray(ids, dtype=np.int64), embed)
