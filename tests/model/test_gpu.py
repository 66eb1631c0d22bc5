"""GPU paths: bfloat16 by default, mask-free SDPA against eager, flash-attention, 4/8-bit loading,
`device_map="auto"`. Skipped without CUDA; `benchmarks/gpu/run.sh` runs them on a GPU node."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import DynamicCache

from longva_cli.model import attention
from longva_cli.model.compat import cache_kwargs
from longva_cli import LongVA
from longva_cli.model.prompt import Turn, chat_prompt

pytestmark = pytest.mark.gpu


def last_logits(language_model, embeds: torch.Tensor, chunk: int) -> torch.Tensor:
    """Logits [vocab] of the last position of `embeds` [1, seq, d], fed `chunk` positions at a time."""
    cache = DynamicCache(config=language_model.config)
    with torch.inference_mode():
        for start in range(0, embeds.shape[1], chunk):
            logits = language_model(inputs_embeds=embeds[:, start : start + chunk], **cache_kwargs(cache)).logits
    return logits[0, -1].float()


def random_embeds(longva: LongVA, tokens: int) -> torch.Tensor:
    generator = torch.Generator(device="cuda").manual_seed(0)
    size = (1, tokens, longva.model.config.hidden_size)
    return torch.randn(size, generator=generator, device="cuda").to(longva.model.dtype)


def prompt_logits(longva: LongVA, prompt: str) -> torch.Tensor:
    """Logits [vocab] (float32, on the CPU) of the last position of `prompt`, in one pass."""
    ids = longva.tokenizer(prompt, return_tensors="pt").input_ids.to(longva.model.device)
    with torch.inference_mode():
        return longva.model.language_model(input_ids=ids).logits[0, -1].float().cpu()


def test_auto_settings_pick_bfloat16_on_cuda_and_match_float32_on_the_cpu(tiny_checkpoint):
    gpu = LongVA.from_pretrained(str(tiny_checkpoint), device="cuda")
    cpu = LongVA.from_pretrained(str(tiny_checkpoint), device="cpu", dtype="float32")
    assert gpu.model.dtype == torch.bfloat16 and gpu.model.device.type == "cuda"
    prompt = chat_prompt([Turn("user", "Hello?")])
    torch.testing.assert_close(prompt_logits(gpu, prompt), prompt_logits(cpu, prompt), rtol=2e-2, atol=2e-2)
    answer = gpu.ask(None, "Hello?", temperature=0, max_new_tokens=4)
    assert answer.finish_reason == ("length" if answer.generated_tokens == 4 else "stop")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_lower_right_chunks_take_a_kernel_without_a_mask(dtype, monkeypatch):
    def materialised(*args, **kwargs):
        raise AssertionError("a dense mask was built on CUDA")

    monkeypatch.setattr(attention, "_blockwise_lower_right", materialised)
    # LongVA-7B's attention geometry: 28 query heads over 4 KV heads, head dim 128
    query = torch.randn(1, 28, 512, 128, device="cuda", dtype=dtype)
    key = torch.randn(1, 4, 4096, 128, device="cuda", dtype=dtype)
    value = torch.randn_like(key)
    ours = attention.lower_right_causal_attention(query, key, value, groups=7)
    mask = torch.ones(512, 4096, dtype=torch.bool, device="cuda").tril(4096 - 512)
    keys, values = (attention.repeat_kv(t, 7).float() for t in (key, value))
    reference = torch.nn.functional.scaled_dot_product_attention(query.float(), keys, values, attn_mask=mask)
    tolerance = 1e-3 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours.float(), reference, rtol=tolerance, atol=tolerance)


def test_mask_free_sdpa_and_eager_give_the_same_logits(tiny_checkpoint):
    sdpa = LongVA.from_pretrained(str(tiny_checkpoint), device="cuda", attn_implementation="sdpa")
    eager = LongVA.from_pretrained(str(tiny_checkpoint), device="cuda", attn_implementation="eager")
    assert attention.use_mask_free_attention(sdpa.model.language_model) == attention.MASK_FREE_SDPA
    embeds = random_embeds(sdpa, 1500)
    reference = last_logits(eager.model.language_model, embeds, chunk=1500)  # one pass
    for chunk in (256, 1000):  # chunks after a cached prefix attend lower-right
        torch.testing.assert_close(last_logits(sdpa.model.language_model, embeds, chunk), reference, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn not installed")
def test_flash_attention_matches_sdpa(tiny_checkpoint):
    flash = LongVA.from_pretrained(str(tiny_checkpoint), device="cuda", attn_implementation="flash_attention_2")
    sdpa = LongVA.from_pretrained(str(tiny_checkpoint), device="cuda", attn_implementation="sdpa")
    assert attention.prefill_chunk(flash.model.language_model, 432_000, 4096) == 4096
    embeds = random_embeds(sdpa, 1500)
    reference = last_logits(sdpa.model.language_model, embeds, chunk=1500)
    torch.testing.assert_close(last_logits(flash.model.language_model, embeds, 256), reference, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("torchao", marks=pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao not installed")),
        pytest.param("bitsandbytes", marks=pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")),
    ],
)
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantized_loading_answers(tmp_path, image_file, bits, backend):
    from longva_cli.model.tiny import write_tiny_checkpoint

    # hidden 512: torchao's int4 takes its groups of 128 along each layer's input width
    checkpoint = write_tiny_checkpoint(tmp_path / "wide", hidden_size=512, max_shard_size="50MB")
    model = LongVA.from_pretrained(str(checkpoint), device="cuda", dtype="bfloat16", quantize=bits, quantize_backend=backend)
    answer = model.ask(image_file, "Describe the image.", temperature=0, max_new_tokens=3)
    assert answer.visual_tokens == answer.frames * 144


def test_device_map_auto_on_one_gpu_answers_as_a_plain_cuda_load(tiny_checkpoint, video_file):
    mapped = LongVA.from_pretrained(str(tiny_checkpoint), device_map="auto")
    plain = LongVA.from_pretrained(str(tiny_checkpoint), device="cuda")
    devices = {p.device for p in mapped.model.parameters()}
    assert devices == {torch.device("cuda", 0)}
    ours = mapped.ask(video_file, "What happens?", frames=4, temperature=0, max_new_tokens=8)
    theirs = plain.ask(video_file, "What happens?", frames=4, temperature=0, max_new_tokens=8)
    assert (ours.answer, ours.generated_tokens) == (theirs.answer, theirs.generated_tokens)


def lower_right_reference(query, key, value, groups):
    """float32 SDPA with repeated heads and an explicit lower-right causal mask (q = 1: no mask)."""
    q, k = query.shape[2], key.shape[2]
    mask = torch.ones(q, k, dtype=torch.bool, device=query.device).tril(k - q)
    keys, values = (attention.repeat_kv(t, groups).float() for t in (key, value))
    return torch.nn.functional.scaled_dot_product_attention(query.float(), keys, values, attn_mask=mask)


@pytest.mark.parametrize("kernel", ["cudnn", "flash", "efficient", "gemm"])
@pytest.mark.parametrize("queries,past", [(512, 3584), (1, 4095), (1, 70_001)])
def test_measured_kernels_match_the_reference_in_bfloat16(kernel, queries, past):
    from longva_cli.model import kernels

    if kernel == "gemm" and queries > 1:
        pytest.skip("gemm is a decode kernel")
    # LongVA-7B's attention geometry, keys in the KV cache's sequence-major layout
    query = torch.randn(1, 28, queries, 128, device="cuda", dtype=torch.bfloat16)
    key, value = (torch.randn(1, past + queries, 4, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    if kernel == "gemm":
        ours = kernels.gemm_decode(query, key, value, groups=7, scale=None)
    elif queries == 1:
        ours = kernels.decode_attention(query, key, value, groups=7, scale=None, backend=kernel)
    else:
        ours = kernels.split_prefill(query, key, value, groups=7, scale=None, backend=kernel)
    torch.testing.assert_close(ours.float(), lower_right_reference(query, key, value, 7), rtol=2e-2, atol=2e-2)


def test_measured_kernels_and_the_preallocated_cache_give_the_logits_of_dynamic_cache(tiny_checkpoint, tmp_path, monkeypatch):
    from longva_cli.model import kernel_choice
    from longva_cli.model.kv_cache import KVCache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(kernel_choice, "STORE", kernel_choice.ChoiceStore())
    before = LongVA.from_pretrained(str(tiny_checkpoint), device="cuda", attn_implementation="sdpa")  # the kernels longva ran before
    measured = LongVA.from_pretrained(str(tiny_checkpoint), device="cuda", attn_implementation="auto")
    embeds = random_embeds(before, 3000)
    expected = last_logits(before.model.language_model, embeds, 700)
    language_model = measured.model.language_model
    cache = KVCache.for_model(language_model.config)
    cache.reserve(3000)
    with torch.inference_mode():
        for start in range(0, 3000, 700):
            logits = language_model(inputs_embeds=embeds[:, start : start + 700], **cache_kwargs(cache)).logits
        torch.testing.assert_close(logits[0, -1].float(), expected, rtol=2e-2, atol=2e-2)
        step = language_model(input_ids=torch.tensor([[7]], device="cuda"), **cache_kwargs(cache)).logits[0, -1].float()
    assert kernel_choice.measured(), "auto measured the kernels on CUDA"
    assert cache.layers[0].keys.transpose(1, 2).is_contiguous()  # sequence-major on CUDA: cuDNN's stable plans
    reference = DynamicCache(config=language_model.config)
    with torch.inference_mode():
        before.model.language_model(inputs_embeds=embeds, **cache_kwargs(reference))
        expected_step = before.model.language_model(input_ids=torch.tensor([[7]], device="cuda"), **cache_kwargs(reference)).logits[0, -1].float()
    torch.testing.assert_close(step, expected_step, rtol=2e-2, atol=2e-2)


def test_host_visual_tokens_release_the_tower_and_bring_it_back_for_the_next_media(tiny_checkpoint, video_file, image_file):
    """`eval local` and `serve` encode media after media with visual tokens on the host: the
    tower leaves the GPU after each encoding and comes back for the next (not encoding on the CPU)."""
    from longva_cli.engine import MediaSpec, drive
    from longva_cli.engine.answering import encode_media

    longva = LongVA.from_pretrained(str(tiny_checkpoint), device="cuda")

    def tower() -> str:
        return next(longva.model.vision_tower.parameters()).device.type

    for spec in (MediaSpec(video_file, frames=3), MediaSpec(image_file), MediaSpec(video_file, frames=5)):
        seen = []
        (visual,) = drive(encode_media(longva, [spec], on_host=True), lambda event: seen.append(tower()))
        assert seen and set(seen) == {"cuda"}  # every frame batch ran on the GPU
        assert tower() == "cpu" and visual.embeds.device.type == "cpu"


def test_a_v_niah_haystack_held_on_the_host_scores_as_one_on_the_gpu(tiny_checkpoint, tmp_path, monkeypatch):
    """The memory plan's host step for `niah video`: the haystack in pinned host memory, copied a
    prefill chunk at a time, and the tower released; the same predictions as a haystack on the GPU."""
    import json

    from longva_cli.engine.plan import Fitted
    from longva_cli.niah import video as niah_video
    from longva_cli.niah.settings import VideoSettings
    from support.media import write_image, write_video

    (tmp_path / "needles").mkdir()
    write_image(tmp_path / "needles" / "needle.png", 120, 90)
    (tmp_path / "needles" / "needles.jsonl").write_text(json.dumps({"image": "needle.png", "question": "\nWhat is it?", "answer": "A"}) + "\n")
    haystack = write_video(tmp_path / "haystack.mp4", frames=60, fps=10)

    def run(where: str, on_host: bool) -> list:
        monkeypatch.setattr(niah_video, "plan_haystack", lambda *args: Fitted(None, "auto", on_host))
        settings = VideoSettings(haystack=haystack, model=str(tiny_checkpoint), needles=str(tmp_path / "needles"), output=tmp_path / where,
                                 min_frames=2, max_frames=6, frame_step=2, depth_step=0.5, cache_dir=tmp_path / "cache", device="cuda")
        return [item["predicted_ids"] for cell in niah_video.run_video(settings).cells for item in cell["items"]]

    assert run("host", True) == run("device", False)
