"""`LongVA`: a loaded checkpoint (model, tokenizer, preprocessing) and its one-call Python API.

    model = LongVA.from_pretrained("lmms-lab/LongVA-7B-DPO")
    answer = model.ask("movie.mp4", "What happens after the car stops?", frames=128)
    print(answer.answer, answer.visual_tokens)

The work is done by `longva_cli.engine` (encode media, build the prompt, run it through a KV
cache); `ask` here is the short way to use it for one question.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from longva_cli.hub import DEFAULT_MODEL
from longva_cli.model.config import ImageProcessing
from longva_cli.model.modeling import LongVAForCausalLM
from longva_cli.model.prompt import DEFAULT_SYSTEM, END_OF_TURN

if TYPE_CHECKING:
    from longva_cli.engine.objectives import SamplingSettings
    from longva_cli.engine.session import Answer


class LongVA:
    """A loaded LongVA model with its tokenizer and preprocessing."""

    def __init__(
        self,
        model: LongVAForCausalLM,
        tokenizer,
        processing: ImageProcessing,
        name: str = "longva",
        generation_config: dict | None = None,
        load_seconds: float = 0.0,
        folder: Path | None = None,
        fingerprint: str | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.processing = processing
        self.name = name
        self.generation_config = generation_config or {}
        self.load_seconds = load_seconds
        self.folder = folder
        self.fingerprint = fingerprint  # the checkpoint's identity for caches (None: do not cache)
        self.stop_ids = stop_ids(tokenizer, self.generation_config)

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path = DEFAULT_MODEL,
        *,
        device: str = "auto",
        dtype: str = "auto",
        attn_implementation: str = "auto",
        device_map: str | None = None,
        quantize: str | None = None,
        quantize_backend: str = "torchao",
        revision: str | None = None,
        download: bool = True,
        kv_cache: str = "auto",
    ) -> "LongVA":
        """Load a checkpoint folder or hub id (from the local cache, downloading it if missing);
        `kv_cache` is how the KV cache is stored: auto (the model's dtype), bf16 or fp8."""
        from longva_cli.engine.loader import load

        return load(
            model, kind="longva", device=device, dtype=dtype, attn=attn_implementation, device_map=device_map,
            quantize=quantize, quantize_backend=quantize_backend, revision=revision, download=download, kv_cache=kv_cache,
        )

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[seq] token ids -> [seq, d] embeddings."""
        return self.model.embed_tokens(input_ids)

    def sampling_settings(self, **overrides) -> "SamplingSettings":
        """The original's sampling defaults (temperature 0.5, the checkpoint's top-k, else 50) with overrides."""
        from longva_cli.engine.objectives import SamplingSettings

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
    ) -> "Answer":
        """Answer `question` about a video or image (or none), streaming text to `on_text`.

        `cache` is a `longva_cli.engine.VisualCache` to read and keep the media's embeddings.
        """
        from longva_cli.engine import DEFAULT_PREFILL_CHUNK, MediaSpec, Notice, Session, Token, drive

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


def stop_ids(tokenizer, generation_config: dict) -> set[int]:
    """Where an answer ends: the end of the turn (`<|im_end|>`) and the checkpoint's eos ids."""
    eos = generation_config.get("eos_token_id", [])
    return {tokenizer.convert_tokens_to_ids(END_OF_TURN), *(eos if isinstance(eos, list) else [eos])}


__all__ = ["LongVA", "DEFAULT_MODEL", "stop_ids"]
