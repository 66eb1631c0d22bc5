"""One call answers: media and a conversation in, events and a result out.

    request  = Request([Turn("user", "What happens?")], Generate(sampling), media=[MediaSpec(Path("movie.mp4"), 128)])
    answered = drive(answer(model, request, PrefixCache(model.model.language_model), cache), on_event)

`answer` encodes the media (through the visual cache), renders the chat prompt with each media
item's tokens at its `<image>` placeholder, builds the keyed sequence, says whether its KV cache
fits, and runs the objective on the runner. `Session` (ask, chat, `LongVA.ask`), serve's native
worker, `eval local` and the lmms-eval model all answer through it, so a prompt is assembled one
way. V-NIAH does not: its haystack frames are spliced around a needle frame inside one visual
item, so it builds its sequences itself and calls `run` on them.

Events, as every engine generator yields them: `Encoding` and `Notice` while the media is
encoded, `Built` once the sequence is known (before any prefill: a server checks its prompt
budget there and may raise to refuse), `Notice` when the KV cache may not fit, then `run`'s
`Prefilling` and `Token`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence as Items
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from longva_cli.engine.encoder import MediaSpec, encode, release_vision_tower
from longva_cli.engine.memory import check_fits
from longva_cli.engine.objectives import Generate, Generated, Notice, Scored, TeacherForce, run
from longva_cli.engine.sequence import Sequence, Visual, build, prompt_parts
from longva_cli.errors import LongVAError
from longva_cli.model.prompt import DEFAULT_SYSTEM, IMAGE_PLACEHOLDER, Turn, chat_prompt

if TYPE_CHECKING:
    from longva_cli.engine.runner import KVRunner
    from longva_cli.engine.visual_cache import VisualCache
    from longva_cli.model.longva import LoadedLongVA


@dataclass
class Request:
    """What to answer: a conversation about some media, and what to do at its end."""

    turns: list[Turn]  # ends with the user's turn; `<image>` placeholders may stand where media go
    objective: Generate | TeacherForce  # TeacherForce: its target ids follow the prompt and are scored
    media: Items[MediaSpec | Visual] = ()  # specs are encoded; Visuals (encoded earlier) are used as they are
    system: str | None = DEFAULT_SYSTEM


@dataclass
class Built:
    """The prompt is built: `tokens` positions, visual and text, before anything is prefilled."""

    tokens: int


@dataclass
class Answered:
    result: Generated | Scored
    visuals: list[Visual] = field(repr=False)
    prompt_tokens: int  # the built sequence, TeacherForce's targets included
    encode_s: float


class MediaError(LongVAError):
    """A media item that could not be read; `index` says which (a server names the request's field)."""

    def __init__(self, index: int, cause: LongVAError) -> None:
        super().__init__(str(cause))
        self.index = index
        self.exit_code = cause.exit_code


def with_media(turns: list[Turn], media: int) -> list[Turn]:
    """The turns with the media's placeholders opening the first user turn, as the original's
    `<image>\\n{question}`, unless the conversation already places them."""
    if not media or any(IMAGE_PLACEHOLDER in turn.text for turn in turns):
        return list(turns)
    first = next((i for i, turn in enumerate(turns) if turn.role == "user"), None)
    if first is None:
        raise LongVAError("a conversation about media needs a user turn to attach them to.")
    turns = list(turns)
    turns[first] = replace(turns[first], text=f"{IMAGE_PLACEHOLDER}\n" * media + turns[first].text)
    return turns


def encode_media(
    model: "LoadedLongVA", media: Items[MediaSpec | Visual], cache: "VisualCache | None" = None, on_host: bool = False
) -> Generator[object, None, list[Visual]]:
    """Each item's visual tokens, in order (Visuals pass through). With `on_host` they stay in host
    memory and the vision tower leaves the device once they are encoded, so that long videos fit
    small GPUs (the prefill takes them a chunk at a time)."""
    visuals = []
    for index, item in enumerate(media):
        if isinstance(item, Visual):
            visuals.append(item)
            continue
        try:
            visuals.append((yield from encode(model, item, cache, on_host=on_host)))
        except MediaError:
            raise
        except LongVAError as err:
            raise MediaError(index, err) from err
    if on_host:
        release_vision_tower(model)  # a no-op where nothing was encoded from pixels (cache hits, Visuals)
    return visuals


def answer(
    model: "LoadedLongVA",
    request: Request,
    runner: "KVRunner | Callable[[Sequence], KVRunner]",
    cache: "VisualCache | None" = None,
    *,
    visual_tokens_on_host: bool = False,
) -> Generator[object, None, Answered]:
    """Encode, build, check and run `request`. `runner` is a KV runner, or a function that picks
    one for the built sequence (a pool handing out the cache that shares most of it)."""
    started = time.perf_counter()
    visuals = yield from encode_media(model, request.media, cache, visual_tokens_on_host)
    encode_s = time.perf_counter() - started
    parts = prompt_parts(chat_prompt(with_media(request.turns, len(visuals)), request.system), visuals)
    if isinstance(request.objective, TeacherForce):
        parts.append(list(request.objective.target_ids))
    sequence = build(model, parts)
    yield Built(len(sequence))
    warning = check_fits(model.model.language_model, len(sequence))
    if warning:
        yield Notice(warning)
    if callable(runner):
        runner = runner(sequence)
    result = yield from run(model, runner, sequence, request.objective)
    return Answered(result, visuals, len(sequence), encode_s)
