"""GPU paths: bfloat16, flash-attention, 4-bit loading. Skipped without CUDA."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from longva_cli.model.generation import prefill
from longva_cli.model.longva import LongVA

pytestmark = pytest.mark.gpu


def test_auto_settings_pick_bfloat16_on_cuda(tiny_checkpoint):
    model = LongVA.from_pretrained(str(tiny_checkpoint), device="cuda")
    assert model.model.dtype == torch.bfloat16 and model.model.device.type == "cuda"
    answer = model.ask(None, "Hello?", temperature=0, max_new_tokens=4)
    assert answer.generated_tokens <= 4


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn not installed")
def test_flash_attention_matches_sdpa(tiny_checkpoint, video_file):
    flash = LongVA.from_pretrained(str(tiny_checkpoint), device="cuda", attn_implementation="flash_attention_2")
    sdpa = LongVA.from_pretrained(str(tiny_checkpoint), device="cuda", attn_implementation="sdpa")
    visual = sdpa.encode_video(video_file, frames=8)
    embeds, _ = sdpa.prompt_embeds("<image>\nWhat happens?", [visual])
    _, reference = prefill(sdpa.model.language_model, embeds, chunk=256)
    _, ours = prefill(flash.model.language_model, embeds, chunk=256)
    torch.testing.assert_close(ours, reference, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantized_loading_answers(tiny_checkpoint, image_file, bits):
    model = LongVA.from_pretrained(str(tiny_checkpoint), device="cuda", quantize=bits)
    answer = model.ask(image_file, "Describe the image.", temperature=0, max_new_tokens=3)
    assert answer.visual_tokens == answer.frames * 144
