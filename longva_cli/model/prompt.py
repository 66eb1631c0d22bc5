"""The `qwen_1_5` chat template and the tokenisation that splits it at `<image>`.

Exactly the original's string:

    <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n{question}<|im_end|>\n<|im_start|>assistant\n

The prompt is cut at each `<image>`; every text piece is tokenised on its own (Qwen2 adds no
BOS) and the visual tokens of the matching media take the placeholder's place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IMAGE_PLACEHOLDER = "<image>"
DEFAULT_SYSTEM = "You are a helpful assistant."
END_OF_TURN = "<|im_end|>"


@dataclass
class Turn:
    role: str  # "user" or "assistant"
    text: str  # may contain IMAGE_PLACEHOLDER once per attached media


def chat_prompt(turns: list[Turn], system: str | None = DEFAULT_SYSTEM, add_generation_prompt: bool = True) -> str:
    """ChatML text for a conversation; an empty/None system prompt is left out, as the original does."""
    text = f"<|im_start|>system\n{system}{END_OF_TURN}\n" if system else ""
    for turn in turns:
        text += f"<|im_start|>{turn.role}\n{turn.text}{END_OF_TURN}\n"
    if add_generation_prompt:
        text += "<|im_start|>assistant\n"
    return text


def question_prompt(question: str, system: str | None = DEFAULT_SYSTEM, with_media: bool = True) -> str:
    """The one-turn prompt of `ask`: media placeholder, newline, question."""
    user = f"{IMAGE_PLACEHOLDER}\n{question}" if with_media else question
    return chat_prompt([Turn("user", user)], system)


def tokenize_segments(tokenizer, prompt: str) -> list[torch.Tensor]:
    """Token ids of the text between placeholders: k placeholders give k + 1 pieces."""
    return [
        torch.tensor(tokenizer(piece, add_special_tokens=False).input_ids, dtype=torch.long)
        for piece in prompt.split(IMAGE_PLACEHOLDER)
    ]
