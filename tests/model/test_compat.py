"""`longva_cli.model.compat`: one spelling for what transformers renamed between the releases we support."""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from longva_cli.model import compat

CONFIG = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def test_activation_checkpointing_is_enabled_and_keeps_the_gradients():
    torch.manual_seed(0)
    plain = Qwen2ForCausalLM(copy.deepcopy(CONFIG)).train()
    checkpointed = copy.deepcopy(plain)
    compat.enable_activation_checkpointing(checkpointed, use_reentrant=False)
    assert all(layer.gradient_checkpointing for layer in checkpointed.model.layers)
    assert not any(getattr(layer, "gradient_checkpointing", False) for layer in plain.model.layers)
    ids = torch.randint(0, 64, (1, 12))
    for model in (plain, checkpointed):
        model(input_ids=ids, labels=ids).loss.backward()
    for (name, ours), theirs in zip(checkpointed.named_parameters(), plain.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, msg=name)


def test_cache_kwargs_feed_and_extend_a_kv_cache():
    model = Qwen2ForCausalLM(copy.deepcopy(CONFIG)).eval()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.arange(5)[None], **compat.cache_kwargs(cache))
        model(input_ids=torch.arange(3)[None], **compat.cache_kwargs(cache))
    assert cache.get_seq_length() == 8
