"""Differences between the transformers releases we support, named once.

transformers 5.24 renamed the decoder's `past_key_values` argument to `cache` (the old name
is deprecated until 5.40) and `gradient_checkpointing_enable` to `activation_checkpointing_enable`
(the old name is deprecated until 6); vLLM and many GPU images (5.17) pin releases before both.
"""

from __future__ import annotations

import inspect

from transformers import Qwen2Model

# The keyword under which this transformers release takes a KV cache.
CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(Qwen2Model.forward).parameters else "past_key_values"


def cache_kwargs(cache) -> dict:
    """Keyword arguments that make a decoder forward read and extend `cache`."""
    return {CACHE_ARGUMENT: cache, "use_cache": True}


def enable_activation_checkpointing(model, **checkpoint_kwargs) -> None:
    """Recompute each layer's activations in the backward pass instead of keeping them;
    `checkpoint_kwargs` go to `torch.utils.checkpoint.checkpoint` (e.g. use_reentrant=False)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
