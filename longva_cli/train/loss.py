"""Next-token cross-entropy that never holds the full [sequence x vocabulary] logits.

At 224K tokens and Qwen2's 152K vocabulary the logits alone would be ~68 GB in fp32. We
project the final hidden states to the vocabulary a chunk at a time and recompute each
chunk's logits in the backward pass (activation checkpointing), so only one chunk of logits
exists at any moment.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from longva_cli.defaults import LOSS_CHUNK


def _chunk_loss(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    logits = head(hidden).float()  # fp32 softmax for a stable loss in bf16 training
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, chunk_size: int = LOSS_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss and the number of counted tokens, for hidden [..., d] and labels [...].

    Returning the sum (not the mean) lets callers average over ranks and micro-batches
    exactly. Labels equal to -100 are ignored.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start : start + chunk_size], labels[start : start + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, h, y, head, use_reentrant=False)
        else:
            total = total + _chunk_loss(h, y, head)
    return total, (labels != -100).sum()


class CausalLMLoss(torch.nn.Module):
    """A causal LM plus chunked loss as one module, so DeepSpeed wraps and shards both.

    forward(input_ids, labels, position_ids) -> mean loss over this rank's tokens. Every rank
    holds the same number of tokens, so the data-parallel gradient average that DeepSpeed does
    over all ranks equals the gradient of the loss averaged over the whole sequence and batch.
    """

    def __init__(self, model: torch.nn.Module, chunk_size: int = LOSS_CHUNK) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.model.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        total, count = chunked_cross_entropy(hidden, labels, self.model.lm_head, self.chunk_size)
        return total / count.clamp(min=1)
