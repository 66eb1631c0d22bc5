"""`LoadedLongVA`: a loaded checkpoint: the network, its tokenizer and preprocessing.

The engine (`longva_cli.engine`) works on this; `longva_cli.api.LongVA` adds the one-call
Python API (`from_pretrained`, `ask`) on top of it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from longva_cli.model.config import ImageProcessing
from longva_cli.model.modeling import LongVAForCausalLM
from longva_cli.model.prompt import END_OF_TURN


class LoadedLongVA:
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

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[seq] token ids -> [seq, d] embeddings."""
        return self.model.embed_tokens(input_ids)


def stop_ids(tokenizer, generation_config: dict) -> set[int]:
    """Where an answer ends: the end of the turn (`<|im_end|>`) and the checkpoint's eos ids."""
    eos = generation_config.get("eos_token_id", [])
    return {tokenizer.convert_tokens_to_ids(END_OF_TURN), *(eos if isinstance(eos, list) else [eos])}


__all__ = ["LoadedLongVA", "stop_ids"]
