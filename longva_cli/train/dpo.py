"""Direct preference optimisation (sigmoid DPO), as used for LongVA-7B -> LongVA-7B-DPO.

For a prompt with a preferred (chosen) and a dispreferred (rejected) answer, with summed
answer log-probabilities under the trained policy (pi) and a frozen reference (ref):

    loss = -log sigmoid(beta * ((pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)))

The reference is either a frozen copy of the starting model, or (`dpo.reference:
precomputed`) the starting model's log-probabilities computed once before the first update,
which needs no second model in memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def sequence_logps(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    """Summed log-probability of the labelled tokens of each sequence.

    hidden [S, T, d] are the states that predict labels [S, T] (already shifted by one);
    only labelled positions go through the LM head, so no [S, T, vocab] tensor is made.
    """
    rows, cols = (labels != IGNORE).nonzero(as_tuple=True)
    logits = head(hidden[rows, cols]).float()  # [K, vocab]
    token_logps = logits.log_softmax(-1).gather(-1, labels[rows, cols].unsqueeze(-1)).squeeze(-1)  # [K]
    return torch.zeros(labels.shape[0], dtype=torch.float32, device=hidden.device).index_add(0, rows, token_logps)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean sigmoid DPO loss over pairs, and the usual reward statistics for logging."""
    chosen_reward = beta * (policy_chosen - reference_chosen)
    rejected_reward = beta * (policy_rejected - reference_rejected)
    loss = -F.logsigmoid(chosen_reward - rejected_reward).mean()
    stats = {
        "reward_chosen": chosen_reward.mean().item(),
        "reward_rejected": rejected_reward.mean().item(),
        "reward_margin": (chosen_reward - rejected_reward).mean().item(),
        "reward_accuracy": (chosen_reward > rejected_reward).float().mean().item(),
    }
    return loss, stats
