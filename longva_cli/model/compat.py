"""Differences between the transformers releases we support, named once.

transformers 5.24 renamed the decoder's `past_key_values` argument to `cache` (the old name
is deprecated until 5.40); vLLM and many GPU images pin releases before the rename.
"""

from __future__ import annotations

import inspect

from transformers import Qwen2Model

# The keyword under which this transformers release takes a KV cache.
CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(Qwen2Model.forward).parameters else "past_key_values"


def cache_kwargs(cache) -> dict:
    """Keyword arguments that make a decoder forward read and extend `cache`."""
    return {CACHE_ARGUMENT: cache, "use_cache": True}
