"""The model package: checkpoint layout, encoder path, prompt, generation. Facts sections 1-2."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from longva_cli.errors import LongVAError
from longva_cli.model.checkpoint import load_longva
from longva_cli.model.files import weight_map
from longva_cli.model.config import CLIP_L_336, multimodal_config, read_config, vision_settings
from longva_cli.engine import Generate, MediaSpec, PrefixCache, SamplingSettings, Session, Visual, VisualCache, build, drive, encode, prompt_parts, run
from longva_cli.model.prompt import DEFAULT_SYSTEM, Turn, question_prompt, tokenize_segments

EXACT_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n"
    "What happens?<|im_end|>\n<|im_start|>assistant\n"
)


def encode_video(longva, path, frames):
    return drive(encode(longva, MediaSpec(path, frames)))


def encode_image(longva, image):
    return drive(encode(longva, MediaSpec(image)))


def prompt_embeds(longva, prompt, visuals):
    sequence = build(longva, prompt_parts(prompt, visuals))
    return sequence.embed(0, len(sequence))


def generate(longva, embeds, settings, stop_ids, prefill_chunk=4096):
    """Token ids generated after [seq, d] embeddings by the engine, from an empty cache."""
    model = SimpleNamespace(tokenizer=longva.tokenizer, stop_ids=stop_ids)
    sequence = build(model, [Visual(embeds, "video", 1)])
    runner = PrefixCache(longva.model.language_model, prefill_chunk)
    return drive(run(model, runner, sequence, Generate(settings))).token_ids


def last_logits(language_model, embeds, chunk):
    sequence = build(None, [Visual(embeds, "video", 1)])
    hidden = list(PrefixCache(language_model, chunk).chunks(sequence, len(sequence), len(sequence) - 1))[-1].hidden
    return language_model.lm_head(hidden[-1:])[0].float()



# ---- checkpoint layout ----------------------------------------------------------------------


def test_checkpoint_uses_the_hub_key_names(tiny_checkpoint):
    keys = set(weight_map(tiny_checkpoint))
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(2):
        for p in ("q", "k", "v"):
            expected |= {f"model.layers.{i}.self_attn.{p}_proj.weight", f"model.layers.{i}.self_attn.{p}_proj.bias"}
        expected |= {f"model.layers.{i}.self_attn.o_proj.weight"}
        expected |= {f"model.layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
        expected |= {f"model.layers.{i}.{n}_layernorm.weight" for n in ("input", "post_attention")}
    expected |= {f"model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    tower = "model.vision_tower.vision_tower.vision_model."
    expected |= {tower + "embeddings.class_embedding", tower + "embeddings.patch_embedding.weight",
                 tower + "embeddings.position_embedding.weight", tower + "pre_layrnorm.weight",
                 tower + "post_layernorm.weight", tower + "encoder.layers.0.self_attn.q_proj.weight"}
    assert expected <= keys
    assert keys - expected <= {k for k in keys if k.startswith(tower)}
    assert len(set(weight_map(tiny_checkpoint).values())) > 1, "the tiny checkpoint should be sharded like the real one"


def test_checkpoint_config_has_the_llava_qwen_fields(tiny_checkpoint):
    raw = read_config(tiny_checkpoint)
    assert raw["model_type"] == "llava_qwen"
    assert raw["mm_projector_type"] == "mlp2x_gelu"
    assert raw["mm_vision_select_layer"] == -2
    assert raw["mm_vision_select_feature"] == "patch"
    assert raw["mm_patch_merge_type"] == "unires"
    assert raw["image_aspect_ratio"] == "anyres"
    assert raw["mm_spatial_pool_stride"] == 2 and raw["mm_spatial_pool_mode"] == "average"
    assert raw["tie_word_embeddings"] is False


def test_unknown_config_keys_are_tolerated(tiny_checkpoint, tmp_path):
    folder = tmp_path / "extra"
    shutil.copytree(tiny_checkpoint, folder)
    raw = read_config(folder)
    raw.update(mm_resampler_type=None, mm_newline_position="grid", some_future_key={"a": 1})
    (folder / "config.json").write_text(json.dumps(raw))
    model = load_longva(folder, dtype=torch.float32, attn_implementation="sdpa")
    assert model.tokens_per_image == 144


def test_loading_is_strict_about_missing_tower_weights(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    victim = "model.vision_tower.vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight"
    shard = folder / index["weight_map"].pop(victim)
    tensors = load_file(shard)
    del tensors[victim]
    save_file(tensors, shard, metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(LongVAError, match="vision tower"):
        load_longva(folder, dtype=torch.float32, attn_implementation="sdpa")


def test_loaded_weights_equal_the_files(tiny_checkpoint, tiny_longva):
    from safetensors import safe_open

    files = weight_map(tiny_checkpoint)
    model = tiny_longva.model
    pairs = {
        "lm_head.weight": model.language_model.lm_head.weight,
        "model.mm_projector.2.bias": model.mm_projector[2].bias,
        "model.vision_tower.vision_tower.vision_model.pre_layrnorm.weight": model.vision_tower.vision_model.pre_layrnorm.weight
        if hasattr(model.vision_tower, "vision_model") else model.vision_tower.pre_layrnorm.weight,
    }
    for key, param in pairs.items():
        with safe_open(tiny_checkpoint / files[key], framework="pt") as f:
            assert torch.equal(f.get_tensor(key), param.detach())


def test_tower_settings_come_from_mm_vision_tower(tiny_checkpoint):
    mm = multimodal_config(read_config(tiny_checkpoint))
    vision, processing = vision_settings(mm)
    assert vision.hidden_size == 32 and vision.image_size == 336 and vision.patch_size == 14
    assert processing.resize == 336


def test_clip_l_336_is_built_in_for_offline_use():
    for tower in (CLIP_L_336, "/mnt/somebody/checkpoints/clip-vit-large-patch14-336"):
        vision, processing = vision_settings(multimodal_config({"mm_vision_tower": tower}))
        assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (1024, 24, 16)
        assert (vision.image_size, vision.patch_size) == (336, 14)
        assert (vision.image_size // vision.patch_size) ** 2 == 576
    with pytest.raises(LongVAError, match="not available offline"):
        vision_settings(multimodal_config({"mm_vision_tower": "someone/unknown-tower"}))


def test_text_only_checkpoint_is_refused():
    with pytest.raises(LongVAError, match="text-only"):
        multimodal_config({"model_type": "qwen2", "hidden_size": 8})


# ---- encoder path ---------------------------------------------------------------------------


def test_frames_take_layer_minus_2_drop_cls_project_then_pool(tiny_longva):
    model = tiny_longva.model
    pixels = torch.randn(3, 3, 336, 336)
    with torch.no_grad():
        hidden = model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        assert len(hidden) == model.vision_tower.config.num_hidden_layers + 1
        features = hidden[-2][:, 1:]  # [3, 576, 32]
        assert features.shape == (3, 576, 32)
        projected = model.mm_projector(features)  # [3, 576, 64]
        grid = projected.view(3, 24, 24, -1)
        expected = (grid[:, 0::2, 0::2] + grid[:, 0::2, 1::2] + grid[:, 1::2, 0::2] + grid[:, 1::2, 1::2]) / 4
        expected = expected.reshape(3, 144, -1)  # row-major 12x12
        ours = model.encode_pixels(pixels)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
        pooled_first = model.mm_projector(
            torch.nn.functional.avg_pool2d(features.view(3, 24, 24, -1).permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1).reshape(3, 144, -1)
        )
        assert not torch.allclose(ours, pooled_first, atol=1e-4), "pooling must come after the projector"


def test_projector_is_linear_gelu_linear(tiny_longva):
    layers = tiny_longva.model.mm_projector
    assert [type(m).__name__ for m in layers] == ["Linear", "GELU", "Linear"]
    assert (layers[0].in_features, layers[0].out_features, layers[2].out_features) == (32, 64, 64)


def test_video_gives_144_tokens_per_frame(tiny_longva, video_file):
    visual = encode_video(tiny_longva, video_file, frames=7)
    assert visual.images == 7 and visual.embeds.shape == (7 * 144, 64)
    assert visual.frame_ids == [0, 4, 9, 14, 19, 24, 29]


def test_video_frames_are_encoded_in_time_order_without_separators(tiny_longva, video_file):
    from longva_cli.media import open_video
    from longva_cli.model.processing import preprocess

    ids = [0, 14, 29]
    frames = open_video(video_file)._get(ids)
    expected = tiny_longva.model.encode_pixels(preprocess(list(frames), tiny_longva.processing)).flatten(0, 1)
    visual = encode_video(tiny_longva, video_file, frames=3)
    assert visual.frame_ids == ids
    torch.testing.assert_close(visual.embeds, expected)


def test_image_gives_144_tokens_per_crop_base_image_dropped(tiny_longva):
    visual = encode_image(tiny_longva, Image.new("RGB", (900, 900), (10, 200, 30)))
    assert visual.grid == (672, 672) and visual.images == 4
    assert visual.embeds.shape == (4 * 144, 64)  # a 2x2 grid: 576 tokens


# ---- prompt and generation ------------------------------------------------------------------


def test_prompt_is_the_exact_qwen_1_5_string():
    assert question_prompt("What happens?") == EXACT_PROMPT


def test_prompt_is_split_at_image_and_tokenised_without_bos(tiny_longva):
    tokenizer = tiny_longva.tokenizer
    before, after = tokenize_segments(tokenizer, EXACT_PROMPT)
    start = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    assert before.tolist() == tokenizer(start, add_special_tokens=False).input_ids
    assert before[0].item() == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert after.tolist() == tokenizer("\nWhat happens?<|im_end|>\n<|im_start|>assistant\n").input_ids


def test_prompt_embeds_put_visual_tokens_at_the_placeholder(tiny_longva, video_file):
    visual = encode_video(tiny_longva, video_file, frames=2)
    embeds = prompt_embeds(tiny_longva, EXACT_PROMPT, [visual])
    before, after = tokenize_segments(tiny_longva.tokenizer, EXACT_PROMPT)
    assert embeds.shape[0] == len(before) + 288 + len(after)
    torch.testing.assert_close(embeds[len(before) : len(before) + 288], visual.embeds)


def test_chunked_prefill_gives_the_logits_of_one_pass(tiny_longva):
    lm = tiny_longva.model.language_model
    embeds = torch.randn(300, 64) * 0.5
    with torch.no_grad():
        full = lm(inputs_embeds=embeds[None]).logits[0, -1]
        for chunk in (1000, 64, 7):
            torch.testing.assert_close(last_logits(lm, embeds, chunk), full, rtol=1e-5, atol=1e-5)


def test_greedy_decoding_matches_transformers_generate(tiny_longva, video_file):
    visual = encode_video(tiny_longva, video_file, frames=3)
    embeds = prompt_embeds(tiny_longva, EXACT_PROMPT, [visual])
    lm = tiny_longva.model.language_model
    ours = generate(tiny_longva, embeds, SamplingSettings(max_new_tokens=12, temperature=0), stop_ids=set(), prefill_chunk=50)
    reference = lm.generate(inputs_embeds=embeds[None], do_sample=False, max_new_tokens=12, min_new_tokens=12, eos_token_id=None, pad_token_id=0)
    assert ours == reference[0].tolist()


def test_seeded_sampling_matches_transformers_generate(tiny_longva, video_file):
    visual = encode_video(tiny_longva, video_file, frames=2)
    embeds = prompt_embeds(tiny_longva, EXACT_PROMPT, [visual])
    lm = tiny_longva.model.language_model
    settings = SamplingSettings(max_new_tokens=10, temperature=0.5, top_k=50, seed=1234)
    ours = generate(tiny_longva, embeds, settings, stop_ids=set())
    torch.manual_seed(1234)
    reference = lm.generate(
        inputs_embeds=embeds[None], do_sample=True, temperature=0.5, top_k=50, top_p=None, max_new_tokens=10,
        min_new_tokens=10, eos_token_id=None, pad_token_id=0,
    )
    assert ours == reference[0].tolist()


def test_generation_stops_at_im_end(tiny_longva):
    embeds = torch.randn(20, 64)
    free = generate(tiny_longva, embeds, SamplingSettings(max_new_tokens=5, temperature=0), stop_ids=set())
    im_end = tiny_longva.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in tiny_longva.stop_ids
    stopped = generate(tiny_longva, embeds, SamplingSettings(max_new_tokens=5, temperature=0), stop_ids={free[2]})
    assert stopped == free[: free.index(free[2])]


def test_a_stream_that_ends_inside_a_character_ends_as_the_answer_does(tiny_longva):
    import numpy as np

    from longva_cli.engine import Token, token_sequence
    from longva_cli.engine.runner import Chunk

    tokenizer = tiny_longva.tokenizer
    # "a", then byte 0xE2 (byte-level BPE writes it "â"): the first of a three-byte character's bytes
    script = [tokenizer.convert_tokens_to_ids("a"), tokenizer.convert_tokens_to_ids("â")]
    vocab = tiny_longva.model.language_model.config.vocab_size

    class Scripted:
        """A runner whose model says the script's tokens, one a step."""

        def __init__(self):
            self.said = 0
            self.language_model = SimpleNamespace(lm_head=lambda hidden: self.next_logits()[None])

        def next_logits(self):
            self.said += 1
            return torch.nn.functional.one_hot(torch.tensor(script[self.said - 1]), vocab).float()  # [vocab]

        def shared_with(self, sequence):
            return 0

        def reserve(self, positions):
            pass  # holds no cache

        def chunks(self, sequence, stop, need_from):
            yield Chunk(0, torch.zeros(stop, 4))

        def step(self, token_id):
            return self.next_logits()

    streamed = []
    sequence = token_sequence(tiny_longva, np.arange(5))
    generated = drive(run(tiny_longva, Scripted(), sequence, Generate(SamplingSettings(max_new_tokens=2, temperature=0))),
                      lambda event: streamed.append(event.text) if isinstance(event, Token) else None)
    assert generated.text == "a\ufffd" and "".join(streamed) == generated.text


def test_tiny_answers_follow_the_question_the_system_prompt_the_history_and_the_frames(tiny_longva, video_file, tmp_path):
    """The reuse tests compare a cached answer with a cold one: they notice a runner that answers the
    wrong question, system prompt or conversation only if the tiny model's answer depends on each."""
    greedy = SamplingSettings(max_new_tokens=8, temperature=0)
    frames_once = VisualCache(tmp_path)  # each frame count is decoded and encoded once, not per question

    def answer(question, frames=3, system=DEFAULT_SYSTEM, turns=None):
        session = Session(tiny_longva, [MediaSpec(video_file, frames)], system=system, turns=turns, keep_history=False, cache=frames_once)
        answered = drive(session.ask(question, greedy))
        assert answered.finish_reason == "length"  # never ends on its own: tests keep a worker busy with it
        return answered.answer

    questions = ["What happens?", "What colour is the square?", "Describe the image in detail.", "Where is the red car?", "Who?", "Why?"]
    answers = [answer(question) for question in questions]
    assert len(set(answers)) == len(questions), answers
    assert answer(questions[0], frames=2) != answers[0]
    systems = [DEFAULT_SYSTEM, "You are a pirate.", None]
    assert len({answer(questions[0], system=system) for system in systems}) == len(systems)
    histories = [[Turn("user", "<image>\n" + question), Turn("assistant", reply)] for question, reply in zip(questions[:3], answers)]
    assert len({answer("And then?", turns=history) for history in histories}) == len(histories)


def test_ask_reports_counts_and_streams_the_answer(tiny_longva, video_file):
    pieces = []
    answer = tiny_longva.ask(video_file, "What happens?", frames=4, temperature=0, max_new_tokens=6, on_text=pieces.append)
    assert answer.media_type == "video" and answer.frames == 4 and answer.visual_tokens == 576
    assert answer.prompt_tokens == 576 + len(tiny_longva.tokenizer(EXACT_PROMPT.replace("<image>", "")).input_ids)
    assert "".join(pieces).strip() == answer.answer
    assert set(answer.timings) >= {"load_s", "encode_s", "prefill_s", "generate_s"}


def test_kv_cache_estimate_counts_layers_heads_and_dtype():
    from types import SimpleNamespace

    from longva_cli.engine.memory import kv_cache_bytes

    longva_7b = SimpleNamespace(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, num_hidden_layers=28, head_dim=None)
    # 3000 frames x 144 tokens in bf16: 2 x 28 layers x 4 heads x 128 dims x 2 bytes = 57,344 bytes a token.
    assert kv_cache_bytes(longva_7b, 432_000, torch.bfloat16) == 432_000 * 57_344


def test_sliding_window_is_off_when_the_config_disables_it(tiny_checkpoint, tiny_longva):
    # The tiny config, like LongVA's, says sliding_window 131072 with use_sliding_window false.
    raw = read_config(tiny_checkpoint)
    assert raw["use_sliding_window"] is False and raw["sliding_window"] == 131072
    config = tiny_longva.model.config
    assert config.sliding_window is None
    assert set(config.layer_types) == {"full_attention"}


def test_ask_warns_when_the_kv_cache_will_not_fit(tiny_longva, video_file, monkeypatch):
    import longva_cli.engine.memory as memory

    monkeypatch.setattr(memory, "available_memory", lambda device: 1000)
    warnings = []
    tiny_longva.ask(video_file, "Q?", frames=2, temperature=0, max_new_tokens=1, on_warning=warnings.append)
    assert len(warnings) == 1 and "KV cache" in warnings[0]


def test_prefill_chunks_shrink_with_sequence_length_under_sdpa():
    from longva_cli.model.attention import prefill_chunk as bounded_chunk

    # transformers' own SDPA (the mask-free variant the loader selects keeps the chunk; test_attention.py)
    lm = SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa"), device=torch.device("cpu"))
    assert bounded_chunk(lm, 10_000, 4096) == 4096
    assert bounded_chunk(lm, 74_000, 4096) == (1 << 26) // 74_000  # 906 on CPU
    assert bounded_chunk(lm, 10**9, 4096) == 128
    assert bounded_chunk(lm, 10**9, 7) == 7


# transformers notes that with inputs_embeds the penalty covers generated tokens only: as in the original
@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty` with `inputs_embeds`")
def test_checkpoint_generation_config_sampling_matches_transformers_generate(tiny_longva, video_file):
    # Qwen2-Instruct-style generation configs carry top_k 20 and repetition_penalty 1.05; the
    # original's generate applied both (top_p was passed as None), in greedy mode too.
    visual = encode_video(tiny_longva, video_file, frames=2)
    embeds = prompt_embeds(tiny_longva, EXACT_PROMPT, [visual])
    lm = tiny_longva.model.language_model
    for temperature in (0.5, 0):
        settings = SamplingSettings(max_new_tokens=10, temperature=temperature, top_k=20, repetition_penalty=1.05, seed=7)
        ours = generate(tiny_longva, embeds, settings, stop_ids=set())
        torch.manual_seed(7)
        reference = lm.generate(
            inputs_embeds=embeds[None], do_sample=temperature > 0, temperature=temperature or None, top_k=20, top_p=None,
            repetition_penalty=1.05, max_new_tokens=10, min_new_tokens=10, eos_token_id=None, pad_token_id=0,
        )
        assert ours == reference[0].tolist()


def test_sampling_defaults_come_from_the_checkpoint_generation_config(tiny_longva):
    saved = tiny_longva.generation_config
    try:
        tiny_longva.generation_config = {"top_k": 20, "repetition_penalty": 1.05, "top_p": 0.8, "temperature": 0.7}
        settings = tiny_longva.sampling_settings()
        # temperature 0.5 and no top-p are the original demo's call arguments; the rest comes from the file
        assert (settings.temperature, settings.top_p, settings.top_k, settings.repetition_penalty) == (0.5, None, 20, 1.05)
        tiny_longva.generation_config = {}
        assert tiny_longva.sampling_settings().top_k == 50  # transformers' default when the file has none
    finally:
        tiny_longva.generation_config = saved


def test_questions_about_one_video_reuse_its_prefix_and_answer_the_same(tiny_longva, video_file):
    visual = encode_video(tiny_longva, video_file, frames=3)
    prefix = PrefixCache(tiny_longva.model.language_model, chunk=100)
    sampling = SamplingSettings(max_new_tokens=6, temperature=0)

    def answer(runner, sequence):
        generated = drive(run(tiny_longva, runner, sequence, Generate(sampling)))
        return generated.text, len(generated.token_ids)

    answers = []
    for number, question in enumerate(["What happens?", "What colour is the square?", "What happens?"]):
        sequence = build(tiny_longva, prompt_parts(question_prompt(question), [visual]))
        before = prefix.forwarded
        answers.append(answer(prefix, sequence))
        assert answers[-1] == answer(PrefixCache(tiny_longva.model.language_model), sequence)
        if number:  # only the question and what follows it is computed again
            assert prefix.forwarded - before < len(sequence) - 3 * 144
    assert answers[0] != answers[1] and answers[0] == answers[2]  # each question got its own answer
