"""`LongVA`: the one-call Python API, above the engine that does the work.

    model = LongVA.from_pretrained("lmms-lab/LongVA-7B-DPO")
    answer = model.ask("movie.mp4", "What happens after the car stops?", frames=128)
    print(answer.answer, answer.visual_tokens)

`longva_cli.engine` encodes the media, builds the prompt and runs it through a KV cache; `ask`
here is the short way to use it for one question. A `LongVA` is a `LoadedLongVA`, so every
engine call takes it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PIL import Image

from longva_cli.engine.encoder import MediaSpec
from longva_cli.engine.loader import load
from longva_cli.engine.objectives import Notice, SamplingSettings, Token, drive
from longva_cli.engine.runner import DEFAULT_PREFILL_CHUNK
from longva_cli.engine.session import Answer, Session
from longva_cli.hub import DEFAULT_MODEL
from longva_cli.model.longva import LoadedLongVA
from longva_cli.model.prompt import DEFAULT_SYSTEM


class LongVA(LoadedLongVA):
    """A loaded LongVA model with its tokenizer and preprocessing, and `ask` for one question."""

    @classmethod
    def from_pretrained(cls, model: str | Path = DEFAULT_MODEL, *, attn_implementation: str = "auto", **options) -> LongVA:
        """Load a checkpoint folder or hub id (from the local cache, downloading it if missing).

        `options` are those of `engine.loader.load`, with their defaults there: device, dtype,
        device_map, quantize, quantize_backend, revision, download, and kv_cache (how the KV cache
        is stored: auto (the model's dtype), bf16 or fp8). `attn_implementation` is its `attn`,
        named as transformers names it.
        """
        loaded = load(model, kind="longva", attn=attn_implementation, **options)
        return cls(
            loaded.model, loaded.tokenizer, loaded.processing, loaded.name, loaded.generation_config, loaded.load_seconds,
            folder=loaded.folder, fingerprint=loaded.fingerprint,
        )

    def sampling_settings(self, **overrides) -> SamplingSettings:
        """The original's sampling defaults (temperature 0.5, the checkpoint's top-k, else 50) with overrides."""
        return SamplingSettings.defaults(self.generation_config, **overrides)

    def ask(
        self,
        media: str | Path | Image.Image | None,
        question: str,
        *,
        frames: int | None = None,
        fps: float | None = None,
        system: str | None = DEFAULT_SYSTEM,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = 0,
        prefill_chunk: int | None = None,
        cache=None,
        on_text: Callable[[str], None] | None = None,
        on_warning: Callable[[str], None] | None = None,
        on_event: Callable[[object], None] | None = None,
    ) -> Answer:
        """Answer `question` about a video or image (or none), streaming text to `on_text`.

        `cache` is a `longva_cli.engine.VisualCache` to read and keep the media's embeddings.
        """
        specs = [] if media is None else [MediaSpec(media if isinstance(media, Image.Image) else Path(media), frames, fps)]
        session = Session(self, specs, system=system, cache=cache, prefill_chunk=prefill_chunk or DEFAULT_PREFILL_CHUNK)
        sampling = self.sampling_settings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
        sampling.seed = seed

        def handle(event) -> None:
            if on_text is not None and isinstance(event, Token) and event.text:
                on_text(event.text)
            elif on_warning is not None and isinstance(event, Notice):
                on_warning(event.message)
            if on_event is not None:
                on_event(event)

        return drive(session.ask(question, sampling), handle)


__all__ = ["LongVA"]
