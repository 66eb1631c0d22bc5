"""What `longva eval ppl` runs with: its own module, importing nothing heavy, so that the
command's options show these defaults without loading numpy or torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from longva_cli.defaults import PREFILL_CHUNK


@dataclass
class PplSettings:
    models: list[str]
    data: str
    output: Path | None = None  # None: runs/ppl-<data name> (see `run_folder`)
    min_tokens: int = 4096
    max_tokens: int = 131072
    token_step: int | None = None  # None: double from min_tokens
    stride: int | None = None  # None: L (disjoint windows)
    text_field: str = "text"
    split: str = "test"
    samples: int | None = None
    min_doc_tokens: int = 0
    cache_dir: Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    attn: str = "auto"
    kv_cache: str = "auto"
    device_map: str | None = None
    sequence_parallel: int = 1
    prefill_chunk: int = PREFILL_CHUNK
    revision: str | None = None
