"""Alignment data: LLaVA conversation files, preference pairs, media, and labelled token ids.

A conversation record (JSON list or JSONL, as LLaVA and LLaVA-NeXT ship them):

    {"id": "0001", "image": "coco/1.jpg" | "video": "clips/a.mp4",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"}, {"from": "gpt", "value": "A cat."}]}

A preference record (JSONL): {"id", "image" | "video", "prompt", "chosen", "rejected"}.

Each sample becomes token ids in which every media item is one `MEDIA_TOKEN` (the original's
IMAGE_TOKEN_INDEX), labels that are -100 everywhere but on the assistant's words, and the
pixels of its media, sampled and preprocessed by the engine's one media path
(`engine.media_pixels`: UniRes crops for an image, `frames` uniform frames for a video, as `ask`).
The model turns the pixels into 144 tokens per crop or frame with
`LongVAForCausalLM.encode_pixels`, and the engine's one splice (`engine.build`) puts them where the
MEDIA_TOKEN stands.

Templates:
- `qwen_1_5`: the ChatML prompt of `ask` (`chat_prompt`); loss on each assistant reply and its
  closing `<|im_end|>` (so the model learns to stop), nothing else.
- `plain` (stage 1 captions): `<image>` + caption + `\\n`, no system prompt; the human text is
  replaced by its placeholders and the loss is on the caption and its closing newline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from longva_cli.errors import LongVAError
from longva_cli.model.prompt import (
    END_OF_TURN,
    IMAGE_PLACEHOLDER,
    Turn,
    chat_prompt,
    tokenize_segments,
)
from longva_cli.train.dpo import sequence_logps
from longva_cli.train.loss import chunked_cross_entropy

IGNORE = -100  # label of positions without loss
MEDIA_TOKEN = -200  # the place of one media item's visual tokens in `input_ids`
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
IMAGE_CROPS_ESTIMATE = 4  # crops of an average image under UniRes, for length grouping only


@dataclass
class Media:
    kind: str  # "image" or "video"
    path: Path


@dataclass
class Record:
    """One training item: a conversation (`turns`) or a preference pair (`prompt`, `chosen`, `rejected`)."""

    id: str
    media: list[Media]
    turns: list[Turn] = field(default_factory=list)
    system: str | None = None  # a "system" turn of the record; None: the recipe's system prompt
    prompt: str = ""
    chosen: str = ""
    rejected: str = ""

    def words(self) -> int:
        texts = [t.text for t in self.turns] + [self.prompt, max(self.chosen, self.rejected, key=len)]
        return sum(len(t.split()) for t in texts)


@dataclass
class Tokens:
    """Token ids (MEDIA_TOKEN at media places) and labels of one sequence, and its media group."""

    input_ids: torch.Tensor  # [L] long
    labels: torch.Tensor  # [L] long
    group: int  # index of the pixel group (in the batch) whose visuals fill the MEDIA_TOKENs


@dataclass
class Example:
    """A loaded sample: pixels of each media item and the sequence(s) that use them."""

    id: str
    pixels: list[torch.Tensor]  # one [n_i, 3, 336, 336] per media item, in placeholder order
    sequences: list[Tokens]  # one (conversation) or two (chosen, rejected)


@dataclass
class Skipped:
    id: str
    reason: str


# ---------------------------------------------------------------- reading records


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a `.json` list or a JSONL file; a bad line is named by its number."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LongVAError(f"data file {path} does not exist; check data.path.")
    text = path.read_text()
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise LongVAError(f"{path} is not valid JSON at line {err.lineno} ({err.msg}); fix that line.") from None
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise LongVAError(f"{path} line {number} is not valid JSON ({err.msg}); fix or remove that line.") from None
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise LongVAError(f"{path} record {number} is a {type(record).__name__}, not a JSON object.")
    return records


def _media(raw: dict, index: int, image_folder: Path | None, video_folder: Path | None) -> list[Media]:
    media = []
    for kind, folder in (("image", image_folder), ("video", video_folder)):
        value = raw.get(kind)
        if value is None:
            continue
        for name in value if isinstance(value, list) else [value]:
            if not isinstance(name, str):
                raise LongVAError(f"sample {raw.get('id', index)}: {kind} must be a file name or a list of them, got {name!r}.")
            path = Path(name).expanduser()
            media.append(Media(kind, path if path.is_absolute() or folder is None else Path(folder).expanduser() / path))
    return media


def _check_placeholders(sample_id: str, texts: Sequence[str], media: list[Media]) -> None:
    count = sum(t.count(IMAGE_PLACEHOLDER) for t in texts)
    if count != len(media):
        raise LongVAError(
            f"sample {sample_id} has {count} {IMAGE_PLACEHOLDER} placeholder(s) for {len(media)} media file(s); "
            f"put one {IMAGE_PLACEHOLDER} in the text per image or video."
        )


def parse_conversation(raw: dict, index: int, image_folder: Path | None, video_folder: Path | None) -> Record:
    sample_id = str(raw.get("id", f"#{index}"))
    turns_raw = raw.get("conversations")
    if not isinstance(turns_raw, list) or not turns_raw:
        raise LongVAError(f"sample {sample_id} has no `conversations` list; each record needs one.")
    system, turns = None, []
    for turn in turns_raw:
        role = turn.get("from") if isinstance(turn, dict) else None
        value = turn.get("value") if isinstance(turn, dict) else None
        if role == "system" and isinstance(value, str):
            system = value
            continue
        if role not in ROLES or not isinstance(value, str):
            raise LongVAError(
                f"sample {sample_id}: each turn needs `from` (human or gpt) and a text `value`, got {turn!r}."
            )
        turns.append(Turn(ROLES[role], value))
    if not any(t.role == "assistant" for t in turns):
        raise LongVAError(f"sample {sample_id} has no gpt turn, so nothing to learn from.")
    media = _media(raw, index, image_folder, video_folder)
    _check_placeholders(sample_id, [t.text for t in turns], media)
    return Record(sample_id, media, turns=turns, system=system)


def parse_preference(raw: dict, index: int, image_folder: Path | None, video_folder: Path | None) -> Record:
    sample_id = str(raw.get("id", f"#{index}"))
    for key in ("prompt", "chosen", "rejected"):
        if not isinstance(raw.get(key), str):
            raise LongVAError(f"sample {sample_id} needs a text `{key}` (preference records have prompt, chosen, rejected).")
    media = _media(raw, index, image_folder, video_folder)
    _check_placeholders(sample_id, [raw["prompt"]], media)
    return Record(sample_id, media, prompt=raw["prompt"], chosen=raw["chosen"], rejected=raw["rejected"])


def load_records(path: Path, kind: str, image_folder: Path | None, video_folder: Path | None) -> tuple[list[Record], list[Skipped]]:
    """Parsed records (kind "conversation" or "preference") and those skipped for missing media."""
    parse = parse_conversation if kind == "conversation" else parse_preference
    records, skipped = [], []
    for index, raw in enumerate(read_records(path), start=1):
        record = parse(raw, index, image_folder, video_folder)
        absent = [m.path for m in record.media if not m.path.is_file()]
        if absent:
            skipped.append(Skipped(record.id, f"missing {absent[0]}"))
        else:
            records.append(record)
    return records, skipped


# ---------------------------------------------------------------- tokens and labels


def _labelled_pieces(record: Record, template: str, system: str | None) -> list[tuple[str, bool]]:
    """The sample's text as (piece, carries loss) pairs whose concatenation is the full prompt."""
    if template == "plain":
        # LLaVA's stage-1 format: the placeholder(s), the caption, a newline; no roles, no system.
        caption = next(t for t in record.turns if t.role == "assistant")
        return [(IMAGE_PLACEHOLDER * len(record.media), False), (caption.text + "\n", True)]
    system = record.system if record.system is not None else system
    pieces, done = [], ""
    for i, turn in enumerate(record.turns):
        if turn.role == "assistant":
            context = chat_prompt(record.turns[:i], system, add_generation_prompt=True)
            pieces += [(context[len(done):], False), (turn.text + END_OF_TURN, True)]
            done = context + turn.text + END_OF_TURN
    pieces.append((chat_prompt(record.turns, system, add_generation_prompt=False)[len(done):], False))
    return [(text, loss) for text, loss in pieces if text]


def tokenize_pieces(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids with one MEDIA_TOKEN per `<image>`, and labels (-100 where a piece carries no loss).

    Each piece is cut at `<image>` and each part tokenised on its own, as `ask` does.
    """
    ids, labels = [], []
    for text, loss in pieces:
        for k, segment in enumerate(tokenize_segments(tokenizer, text)):
            if k:
                ids.append(torch.tensor([MEDIA_TOKEN]))
                labels.append(torch.tensor([IGNORE]))
            ids.append(segment)
            labels.append(segment if loss else torch.full_like(segment, IGNORE))
    return torch.cat(ids), torch.cat(labels)


def conversation_tokens(tokenizer, record: Record, template: str, system: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    return tokenize_pieces(tokenizer, _labelled_pieces(record, template, system))


def preference_tokens(tokenizer, record: Record, system: str | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, labels) of prompt + chosen and prompt + rejected; loss on the response and its `<|im_end|>`."""
    context = chat_prompt([Turn("user", record.prompt)], system, add_generation_prompt=True)
    return [tokenize_pieces(tokenizer, [(context, False), (reply + END_OF_TURN, True)]) for reply in (record.chosen, record.rejected)]


def expand_labels(input_ids: torch.Tensor, labels: torch.Tensor, visual_tokens: list[int]) -> torch.Tensor:
    """Labels at full length: each MEDIA_TOKEN becomes its media's visual tokens, all -100."""
    parts, start = [], 0
    places = (input_ids == MEDIA_TOKEN).nonzero().flatten().tolist()
    for place, count in zip(places, visual_tokens, strict=True):
        parts += [labels[start:place], torch.full((count,), IGNORE, dtype=labels.dtype)]
        start = place + 1
    parts.append(labels[start:])
    return torch.cat(parts)


# ---------------------------------------------------------------- media


def load_pixels(media: Media, processing, pinpoints, frames: int) -> torch.Tensor:
    """[n, 3, 336, 336]: UniRes crops of an image, or `frames` uniform frames of a video."""
    from longva_cli.engine.encoder import MediaSpec, media_pixels

    return media_pixels(MediaSpec(media.path, frames if media.kind == "video" else None), processing, pinpoints)


def spliced(input_ids: torch.Tensor, visuals: list[torch.Tensor]) -> list:
    """Engine parts for `engine.build`: the token ids between MEDIA_TOKENs, each MEDIA_TOKEN
    replaced by its media's visual tokens ([n * 144, d], kept in the autograd graph)."""
    from longva_cli.engine.sequence import Visual

    parts, begin = [], 0
    places = (input_ids == MEDIA_TOKEN).nonzero().flatten().tolist()
    for place, tokens in zip(places, visuals if places else []):
        parts += [input_ids[begin:place].numpy(), Visual(tokens, "media", 0)]
        begin = place + 1
    return parts + [input_ids[begin:].numpy()]


class AlignDataset(torch.utils.data.Dataset):
    """Records -> Examples (or Skipped, when a media file cannot be decoded), for a DataLoader."""

    def __init__(self, records: list[Record], tokenizer, *, mode: str, template: str, system: str | None,
                 processing, pinpoints, frames: int, tokens_per_image: int) -> None:
        self.records = records
        self.tokenizer = tokenizer
        self.mode, self.template, self.system = mode, template, system
        self.processing, self.pinpoints, self.frames = processing, pinpoints, frames
        self.tokens_per_image = tokens_per_image

    def __len__(self) -> int:
        return len(self.records)

    def estimated_length(self, index: int) -> int:
        """Words plus visual tokens: cheap, for grouping samples of similar length (as LLaVA does)."""
        record = self.records[index]
        images = sum(self.frames if m.kind == "video" else IMAGE_CROPS_ESTIMATE for m in record.media)
        return record.words() + images * self.tokens_per_image

    def __getitem__(self, index: int) -> Example | Skipped:
        record = self.records[index]
        try:
            pixels = [load_pixels(m, self.processing, self.pinpoints, self.frames) for m in record.media]
        except Exception as err:  # noqa: BLE001 - a file no decoder can read skips its sample, never the run
            return Skipped(record.id, str(err).rstrip(".") or type(err).__name__)
        if self.mode == "dpo":
            pairs = preference_tokens(self.tokenizer, record, self.system)
        else:
            pairs = [conversation_tokens(self.tokenizer, record, self.template, self.system)]
        return Example(record.id, pixels, [Tokens(ids, labels, 0) for ids, labels in pairs])


# ---------------------------------------------------------------- batches


@dataclass
class Batch:
    """Pixel groups (one per sample) and the sequences that draw on them, capped at max_length."""

    pixels: list[torch.Tensor]  # per sample: [n, 3, 336, 336] (n may be 0 for text-only)
    media_sizes: list[list[int]]  # per sample: images (crops/frames) of each media item
    sequences: list[Tokens]
    labels: list[torch.Tensor]  # per sequence, expanded to full length and capped
    ids: list[str]
    skipped: list[Skipped] = field(default_factory=list)
    truncated: int = 0  # sequences cut at max_length
    tokens_cut: int = 0

    @property
    def tokens(self) -> int:
        return sum(len(label) for label in self.labels)


def collate(items: list[Example | Skipped], max_length: int, tokens_per_image: int) -> Batch:
    """Group loaded samples into a Batch; samples whose answers fall past max_length are skipped."""
    batch = Batch([], [], [], [], [])
    for item in items:
        if isinstance(item, Skipped):
            batch.skipped.append(item)
            continue
        sizes = [len(p) for p in item.pixels]
        kept, cut = [], 0
        for seq in item.sequences:
            full = expand_labels(seq.input_ids, seq.labels, [n * tokens_per_image for n in sizes])
            cut += max(0, len(full) - max_length)
            kept.append(full[:max_length])
        if any((label != IGNORE).sum() == 0 for label in kept):
            batch.skipped.append(Skipped(item.id, f"no answer token within max_length={max_length}"))
            continue
        group = len(batch.pixels)
        batch.pixels.append(torch.cat(item.pixels) if item.pixels else torch.empty(0))
        batch.media_sizes.append(sizes)
        batch.sequences += [Tokens(s.input_ids, s.labels, group) for s in item.sequences]
        batch.labels += kept
        batch.ids.append(item.id)
        batch.truncated += sum(1 for s in item.sequences if cut)
        batch.tokens_cut += cut
    return batch


def length_grouped_batches(lengths: Sequence[int], batch_size: int, world_size: int, seed: int, epoch: int,
                           group_by_length: bool = True, megabatch_factor: int = 50) -> list[list[int]]:
    """An epoch's batches of sample indices: shuffled, and (optionally) of similar lengths.

    A seeded permutation is cut into mega-batches of `megabatch_factor` global batches; each is
    sorted by length and cut into batches, so a batch wastes little padding while the epoch's
    order stays random. The batch order is shuffled again so long batches do not cluster.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)).tolist()
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    mega = batch_size * world_size * megabatch_factor
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def steps_per_epoch(batches: int, world_size: int, grad_accum: int) -> int:
    """Optimizer steps in one pass (at least one: a tiny set wraps around rather than giving zero)."""
    return max(1, batches // (world_size * grad_accum))


# ---------------------------------------------------------------- batch -> loss


class AlignModule(torch.nn.Module):
    """LongVA plus the loss, as one module, so DeepSpeed wraps and shards all of it.

    forward(batch) -> mean cross-entropy over the batch's answer tokens (sft), or the summed
    answer log-probability of each sequence (dpo).
    """

    def __init__(self, model, mode: str, loss_chunk: int, visual_in_graph: bool) -> None:
        super().__init__()
        self.model = model
        self.mode = mode
        self.loss_chunk = loss_chunk
        # Trained tower/projector weights must see a backward pass on every rank and micro
        # step (ZeRO reduces gradients in lock-step): text-only batches encode a black crop
        # whose features count zero, as LLaVA does.
        self.visual_in_graph = visual_in_graph

    def forward(self, batch):
        model = self.model
        side = model.vision_tower.config.image_size
        pixels = [p for p in batch.pixels if len(p)]
        zero = 0.0
        if pixels:
            visual = model.encode_pixels(torch.cat(pixels))  # [images, 144, d]
        else:
            visual = model.encode_pixels(torch.zeros(1, 3, side, side)) if self.visual_in_graph else None
            zero = visual.sum() * 0 if visual is not None else 0.0
            visual = None
        per_media, start = [], 0
        for sizes in batch.media_sizes:
            items = []
            for n in sizes:
                items.append(visual[start : start + n].flatten(0, 1))  # [n * 144, d]
                start += n
            per_media.append(items)
        sequences, labels = batch.sequences, batch.labels
        if not sequences:  # every sample of this micro batch was skipped: a no-loss stand-in
            from longva_cli.train.multimodal_data import Tokens

            sequences = [Tokens(torch.zeros(2, dtype=torch.long), torch.full((2,), IGNORE), 0)]
            labels = [torch.full((2,), IGNORE)]
        from longva_cli.engine.sequence import build

        embeds = []
        for seq, label in zip(sequences, labels):
            sequence = build(model, spliced(seq.input_ids, [v.to(model.dtype) for v in per_media[seq.group]]))
            embeds.append(sequence.embed(0, len(label)))  # [T_i, d], capped as the labels were
        # right padding with an attention mask, as LLaVA pads
        width = max(len(e) for e in embeds)
        inputs = embeds[0].new_zeros(len(embeds), width, embeds[0].shape[-1])  # [S, T, d]
        mask = torch.zeros(len(embeds), width, dtype=torch.long, device=inputs.device)
        targets = torch.full((len(embeds), width), IGNORE, dtype=torch.long, device=inputs.device)
        for i, (embed, label) in enumerate(zip(embeds, labels)):
            inputs[i, : len(embed)] = embed
            mask[i, : len(embed)] = 1
            targets[i, : len(label)] = label.to(inputs.device)
        hidden = model.language_model.model(inputs_embeds=inputs, attention_mask=mask, use_cache=False).last_hidden_state
        head = model.language_model.lm_head
        if self.mode == "dpo":
            return sequence_logps(hidden[:, :-1], targets[:, 1:], head) + zero
        total, count = chunked_cross_entropy(hidden[:, :-1], targets[:, 1:], head, self.loss_chunk)
        return total / count.clamp(min=1) + zero

