"""Conversations: media encoded once, a KV cache kept between questions and turns.

    session = Session(longva, [MediaSpec(Path("movie.mp4"), frames=128)])
    answer = drive(session.ask("What happens first?", sampling))     # encodes, prefills, answers
    answer = drive(session.ask("And then?", sampling))               # prefills only the new turn

With `keep_history=False` every question is asked on its own (the prompt is the media and that
question, as `longva ask` does), and the video's tokens are still prefilled only once: the
questions share everything up to the end of the video.
"""

from __future__ import annotations

import json
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from longva_cli.engine.answering import Request, answer, encode_media, with_media
from longva_cli.engine.encoder import MediaSpec
from longva_cli.engine.objectives import Generate, Generated, SamplingSettings
from longva_cli.engine.runner import DEFAULT_PREFILL_CHUNK, PrefixCache
from longva_cli.engine.sequence import Visual
from longva_cli.errors import LongVAError
from longva_cli.model.prompt import DEFAULT_SYSTEM, Turn

if TYPE_CHECKING:
    from longva_cli.engine.visual_cache import VisualCache
    from longva_cli.model.longva import LoadedLongVA


@dataclass
class Answer:
    """One answered question: the answer and how it was obtained (a line of `longva ask --json`)."""

    answer: str
    model: str
    media: str | None
    media_type: str | None
    frames: int
    visual_tokens: int
    prompt_tokens: int
    generated_tokens: int
    timings: dict[str, float]
    frame_ids: list[int] = field(default_factory=list)
    question: str | None = None
    reused_tokens: int = 0  # prompt positions already in the KV cache (earlier questions, turns)
    finish_reason: str = "stop"

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


class Session:
    """Questions about the same media with one model, sharing its encoding and KV cache."""

    def __init__(
        self,
        model: "LoadedLongVA",
        media: list[MediaSpec] = (),
        *,
        system: str | None = DEFAULT_SYSTEM,
        cache: "VisualCache | None" = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        keep_history: bool = True,
        turns: list[Turn] | None = None,
        visual_tokens_on_host: bool = False,
    ) -> None:
        self.model = model
        self.media = list(media)
        self.system = system
        self.cache = cache
        self.keep_history = keep_history
        self.turns: list[Turn] = list(turns or [])
        self.visuals: list[Visual] | None = None
        # Host-held visual tokens reach the device a prefill chunk at a time, and the vision
        # tower leaves the device once they are encoded (issue 24: long videos on small GPUs).
        self.visual_tokens_on_host = visual_tokens_on_host
        self.runner = PrefixCache(model.model.language_model, prefill_chunk)

    def encode(self) -> Generator[object, None, list[Visual]]:
        """The media's visual tokens (encoded on the first call only)."""
        if self.visuals is None:
            self.visuals = yield from encode_media(self.model, self.media, self.cache, self.visual_tokens_on_host)
        return self.visuals

    def ask(self, question: str, sampling: SamplingSettings) -> Generator[object, None, Answer]:
        started = time.perf_counter()
        visuals = yield from self.encode()
        encode_s = time.perf_counter() - started
        turns = with_media(self.turns + [Turn("user", question)], len(visuals))
        answered = yield from answer(self.model, Request(turns, Generate(sampling), visuals, self.system), self.runner)
        generated: Generated = answered.result
        if self.keep_history:
            self.turns = turns + [Turn("assistant", generated.text)]
        timings = {
            "load_s": self.model.load_seconds,
            "encode_s": encode_s,
            "prefill_s": generated.prefill_s,
            "generate_s": generated.generate_s,
            "total_s": time.perf_counter() - started + self.model.load_seconds,
        }
        if generated.token_ids and generated.generate_s > 0:
            timings["tokens_per_s"] = len(generated.token_ids) / generated.generate_s
        first = visuals[0] if visuals else None
        source = self.media[0].source if self.media else None
        return Answer(
            answer=generated.text,
            model=self.model.name,
            media=str(source) if isinstance(source, (str, Path)) else None,
            media_type=first.kind if first else None,
            frames=first.images if first else 0,
            visual_tokens=sum(len(v) for v in visuals),
            prompt_tokens=generated.prompt_tokens,
            generated_tokens=len(generated.token_ids),
            timings={k: round(v, 3) for k, v in timings.items()},
            frame_ids=first.frame_ids if first else [],
            question=question,
            reused_tokens=generated.reused_tokens,
            finish_reason=generated.finish_reason,
        )

    def reset(self) -> None:
        """Forget the conversation; the media's tokens stay encoded and prefilled."""
        self.turns = []

    def save(self, path: Path, *, overwrite: bool = False) -> None:
        """The conversation as JSON (model, media, system prompt and turns), written atomically:
        the file is whole or untouched. An existing file is replaced only with `overwrite` (else
        FileExistsError), and only a regular file; any other failure is a LongVAError."""
        from longva_cli.engine.runs import write_atomic

        path = Path(path)
        if path.is_dir():
            raise LongVAError(f"{path} is a folder; give a file name, such as {path / 'chat.json'}.")
        if path.exists() and not path.is_file():
            raise LongVAError(f"{path} is not a regular file; give the path of a file.")
        if path.exists() and not overwrite:
            raise FileExistsError(path)
        if not path.parent.is_dir():
            raise LongVAError(f"the folder {path.parent} does not exist; create it or give another path.")
        record = {
            "model": self.model.name,
            "media": [str(spec.source) for spec in self.media],
            "system": self.system,
            "turns": [asdict(turn) for turn in self.turns],
        }
        try:
            write_atomic(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        except OSError as err:
            raise LongVAError(f"could not write {path} ({err.strerror or err}); nothing was written there.") from None
