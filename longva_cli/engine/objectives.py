"""Objectives: what to do with a sequence once it is in a runner.

    Generate(sampling)        sample an answer after the sequence, token by token
    TeacherForce(target_ids)  the sequence ends with `target_ids`: score them (argmax ids and
                              log-probabilities at the positions that predict them)

`run(model, runner, sequence, objective)` is a generator. It yields progress events while it
works (`Prefilling` after each chunk, `Token` for each generated token) and returns its result
(`Generated` or `Scored`) as the generator's return value: inside another generator write
`result = yield from run(...)`; elsewhere `drive(run(...), on_event)`. Stopping the iteration
stops the work at once (between prefill chunks or tokens): that is how requests are cancelled.

Sampling uses transformers' own logits processors in the order `generate` applies them
(repetition penalty, temperature, top-k, top-p), then softmax and `torch.multinomial`, so a
seed gives the same tokens as the original's `model.generate(..., do_sample=True)`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, Union

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from longva_cli.defaults import MAX_NEW_TOKENS, TEMPERATURE
from longva_cli.errors import LongVAError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from longva_cli.engine.runner import KVRunner
    from longva_cli.engine.sequence import Sequence

# Rows of logits computed at once when scoring many positions: 512 x 152K vocabulary in
# float32 is 0.3 GB, whatever the number of positions scored.
SCORE_ROWS = 512
# Temperatures below this decode greedily, as vLLM does (its _SAMPLING_EPS): logits divided by
# 1e-300 overflow float32 to inf and softmax turns them into NaN, while any temperature this
# small already puts all the probability on the top token.
GREEDY_BELOW = 1e-5


class Model(Protocol):
    """What running needs of a model: `LoadedLongVA` and `TextModel` both have it."""

    tokenizer: "PreTrainedTokenizerBase"
    stop_ids: set[int]


@dataclass
class SamplingSettings:
    """temperature 0 (or below GREEDY_BELOW) means greedy decoding; the original demo sampled at 0.5."""

    max_new_tokens: int = MAX_NEW_TOKENS
    temperature: float = TEMPERATURE
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = 0

    @classmethod
    def defaults(cls, generation_config: dict, **overrides) -> "SamplingSettings":
        """The original's sampling (temperature 0.5, no top-p) with the checkpoint's top-k (else
        transformers' 50) and repetition penalty from its generation_config.json; then `overrides`
        that are not None."""
        settings = cls(top_k=generation_config.get("top_k", 50), repetition_penalty=generation_config.get("repetition_penalty"))
        for key, value in overrides.items():
            if value is not None:
                setattr(settings, key, value)
        return settings

    @property
    def greedy(self) -> bool:
        """Whether answers are decoded greedily (argmax) rather than sampled."""
        return self.temperature < GREEDY_BELOW

    def processors(self) -> LogitsProcessorList:
        chain = LogitsProcessorList()
        if self.repetition_penalty not in (None, 1.0):
            chain.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if not self.greedy:
            if self.temperature != 1.0:
                chain.append(TemperatureLogitsWarper(float(self.temperature)))
            if self.top_k:
                chain.append(TopKLogitsWarper(self.top_k))
            if self.top_p is not None and self.top_p < 1.0:
                chain.append(TopPLogitsWarper(self.top_p))
        return chain


# ---- objectives and what they return ------------------------------------------------------------


@dataclass
class Generate:
    sampling: SamplingSettings
    # Ends the answer once it returns True for the text so far (e.g. a harness's stop strings).
    should_stop: Callable[[str], bool] | None = None


@dataclass
class TeacherForce:
    target_ids: list[int]  # the last tokens of the sequence


@dataclass
class Generated:
    text: str  # special tokens removed, stripped, as the original decodes
    token_ids: list[int]
    finish_reason: str  # "stop" (end of turn or should_stop) or "length" (max_new_tokens)
    prompt_tokens: int
    reused_tokens: int  # prompt positions the runner already held (not prefilled again)
    prefill_s: float
    generate_s: float


@dataclass
class Scored:
    target_ids: list[int]
    predicted_ids: list[int]  # argmax at each position that predicts a target
    logprob: float  # sum of log P(target | everything before it)

    @property
    def count(self) -> int:
        return len(self.target_ids)

    @property
    def greedy(self) -> bool:
        """Whether greedy decoding would have produced exactly the targets."""
        return self.predicted_ids == self.target_ids


# ---- events ---------------------------------------------------------------------------------------


@dataclass
class Prefilling:
    done: int  # positions of the sequence now in the runner
    total: int


@dataclass
class Notice:
    """Something the user should know (the KV cache may not fit, a frame cap was applied)."""

    message: str


@dataclass
class Token:
    id: int
    text: str  # new text this token completes ("" while inside a multi-byte character; an answer that
    # ends inside one gets a last event, with the last token's id, that streams the rest as decoded)


Event = Union[Prefilling, Token]  # what `run` yields
Result = TypeVar("Result")


def drive(
    events: Generator[Any, None, Result],
    on_event: Callable[[Any], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> Result | None:
    """Run a generator of events to the end (handing each event to `on_event`); its result.

    With `stop`, checked before each step, the generator is closed as soon as it returns True
    (between frame batches, prefill chunks or tokens) and the result is None.
    """
    while stop is None or not stop():
        try:
            event = next(events)
        except StopIteration as finished:
            return finished.value
        if on_event is not None:
            on_event(event)
    events.close()
    return None


# ---- running --------------------------------------------------------------------------------------


def run(model: Model, runner: "KVRunner", sequence: "Sequence", objective: Generate | TeacherForce) -> Generator[Event, None, Generated | Scored]:
    if isinstance(objective, Generate):
        return (yield from generate(model, runner, sequence, objective))
    return (yield from teacher_force(runner, sequence, objective))


@torch.inference_mode()
def generate(model: Model, runner: "KVRunner", sequence: "Sequence", objective: Generate) -> Generator[Event, None, Generated]:
    """Prefill what the runner does not hold yet, then sample up to a stop id (not fed, not returned).

    The generated tokens stay in the runner (keyed by their ids), so a next prompt that repeats
    this answer (a chat's next turn) prefills only what follows it.
    """
    started = time.perf_counter()
    total = len(sequence)
    reused = runner.shared_with(sequence)
    last = None
    runner.reserve(total + objective.sampling.max_new_tokens)  # the cache never grows while decoding
    for chunk in runner.chunks(sequence, total, need_from=total - 1):
        last = chunk.hidden[-1:]
        yield Prefilling(chunk.stop, total)
    logits = runner.language_model.lm_head(last)[-1].float()  # [vocab]
    prefill_s = time.perf_counter() - started

    sampling = objective.sampling
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    processors = sampling.processors()
    generated = torch.empty((1, 0), dtype=torch.long, device=logits.device)
    ids: list[int] = []
    shown = ""
    finish_reason = "length"
    for step in range(sampling.max_new_tokens):
        scores = processors(generated, logits[None])  # [1, vocab]
        if not sampling.greedy:
            token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)[0, 0]
        else:
            token = scores[0].argmax()
        token_id = int(token)
        if token_id in model.stop_ids:
            finish_reason = "stop"
            break
        ids.append(token_id)
        text = model.tokenizer.decode(ids, skip_special_tokens=True)
        held_back = text.endswith("\ufffd")  # inside a multi-byte character: wait for the rest
        yield Token(token_id, "" if held_back else text[len(shown) :])
        shown = shown if held_back else text
        if objective.should_stop is not None and objective.should_stop(text):
            finish_reason = "stop"
            break
        if step + 1 < sampling.max_new_tokens:
            generated = torch.cat([generated, token.view(1, 1)], dim=1)
            logits = runner.step(token_id)
    text = model.tokenizer.decode(ids, skip_special_tokens=True)
    if text != shown:  # the answer ended inside a multi-byte character: the stream ends as the answer does
        yield Token(ids[-1], text[len(shown) :])
    return Generated(
        text=text.strip(),
        token_ids=ids,
        finish_reason=finish_reason,
        prompt_tokens=total,
        reused_tokens=reused,
        prefill_s=prefill_s,
        generate_s=time.perf_counter() - started - prefill_s,
    )


@torch.inference_mode()
def teacher_force(runner: "KVRunner", sequence: "Sequence", objective: TeacherForce) -> Generator[Event, None, Scored]:
    """Argmax and log-probability at the positions that predict the sequence's last tokens.

    Position i predicts token i + 1, so n targets are predicted by the n positions before the
    last one; the last target itself is never fed. Logits exist only for those positions, a
    few hundred rows at a time, so scoring a 128K-token window needs no 128K x vocab tensor.
    """
    targets = list(objective.target_ids)
    count, total = len(targets), len(sequence)
    if not 0 < count < total or sequence.keys[total - count :].tolist() != targets:
        raise LongVAError("the sequence must end with the tokens to score, and have at least one token before them.")
    stop, need_from = total - 1, total - 1 - count
    head = runner.language_model.lm_head
    wanted = torch.tensor(targets)
    predicted: list[int] = []
    logprob = 0.0
    for chunk in runner.chunks(sequence, stop, need_from):
        rows = chunk.hidden[max(need_from - chunk.start, 0) :]  # positions >= need_from only
        first = max(chunk.start, need_from) - need_from  # index of rows[0] among the targets
        for at in range(0, len(rows), SCORE_ROWS):
            logits = head(rows[at : at + SCORE_ROWS]).float()  # [r, vocab]
            goal = wanted[first + at : first + at + len(logits)].to(logits.device)
            logprob += float(torch.log_softmax(logits, dim=-1).gather(1, goal[:, None]).sum())
            predicted += logits.argmax(-1).tolist()
        yield Prefilling(chunk.stop, stop)
    return Scored(targets, predicted, logprob)
