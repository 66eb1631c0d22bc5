"""Scoring one needle sequence on the engine, with a KV cache shared between consecutive sequences.

The original ran one full forward per (cell, needle) and took logits at every position; at
3000 frames that is 432K x 152K logits, which is why it needed eight GPUs. Here the engine:

- computes logits only where they are read: the answer positions (teacher-forced) or the last
  prompt position and the generated tokens (generate);
- keeps the KV cache of the longest prefix a sequence shares with the previous one
  (`engine.PrefixCache`); V-NIAH's cells are ordered so that the shared prefix (system prompt +
  the haystack frames before the needle) grows monotonically;
- runs the remainder through the decoder in chunks (memory tracks the KV cache).

`naive_teacher_forced` is the reference: one plain forward over the whole sequence.
"""

from __future__ import annotations

import re

import torch

from longva_cli.engine.objectives import Generate, SamplingSettings, TeacherForce, drive, run
from longva_cli.engine.runner import KVRunner
from longva_cli.engine.sequence import Sequence


def teacher_forced(runner: KVRunner, sequence: Sequence, answer_ids: list[int]) -> list[int]:
    """Argmax ids at the positions that predict each answer token (the sequence ends with the answer)."""
    return drive(run(None, runner, sequence, TeacherForce(answer_ids))).predicted_ids


def greedy(model, runner: KVRunner, sequence: Sequence, max_new_tokens: int) -> list[int]:
    """Greedy decoding after the prompt `sequence` (up to one of the model's stop ids, not included)."""
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0, seed=None)
    return drive(run(model, runner, sequence, Generate(settings))).token_ids


@torch.inference_mode()
def naive_teacher_forced(language_model, embeds: torch.Tensor, answer_count: int) -> list[int]:
    """The original's rule on a full forward: logits at every position, argmax at the answer's."""
    total = embeds.shape[0]
    logits = language_model(inputs_embeds=embeds[None]).logits[0]  # [seq, vocab]
    return logits[total - answer_count - 1 : total - 1].argmax(-1).tolist()


def normalise(text: str) -> list[str]:
    """Lower-case words without punctuation: 'The answer is (B).' -> ['the', 'answer', 'is', 'b']."""
    return re.sub(r"[^\w]+", " ", text.lower()).split()


def answer_matches(predicted: str, answer: str) -> bool:
    """Generate scoring: the answer's words appear in the prediction, in order.

    A one-letter answer (an option letter) must be the prediction's first word: a bare 'a'
    inside a sentence is an article, not option A.
    """
    said, wanted = normalise(predicted), normalise(answer)
    if not wanted:
        return False
    if len(wanted) == 1 and len(wanted[0]) == 1 and wanted[0].isalpha():
        return bool(said) and said[0] == wanted[0]
    width = len(wanted)
    return any(said[i : i + width] == wanted for i in range(len(said) - width + 1))
