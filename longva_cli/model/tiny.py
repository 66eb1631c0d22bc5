"""Tiny random checkpoints in the exact hub layout, for tests, benchmarks and smoke runs.

Nothing here can be downloaded on a machine without the hub, so tests write their own:
a byte-level BPE tokenizer with Qwen2's special tokens, and LongVA checkpoints whose key
names, config fields and vision geometry (336 px, 14 px patches, 24x24 grid) are the real
ones; only the widths and depths are small.
"""

from __future__ import annotations

import json
from pathlib import Path

# Qwen2's special tokens, in Qwen2's order (ids follow the BPE vocabulary as they do there).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "You are a helpful assistant.",
    "What happens in the video? Describe the image in detail.",
    "The special magic Singapore number is: 1234567.",
    "A red car stops at the corner, a man gets out and walks to the blue door.",
    "Answer with the option's letter from the given choices directly. A. B. C. D.",
    "Yellow, 200 mg, Times Square, Panda, UC San Diego, balloon, bridegroom.",
    "The quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9.",
]


def build_tiny_tokenizer(vocab_size: int = 512):
    """A Qwen2-style tokenizer (byte-level BPE, no BOS, ChatML tokens) trained in-process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS * 20, trainer)
    backend.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
    )


def save_tiny_tokenizer(tokenizer, folder: Path) -> None:
    """Save so that AutoTokenizer reloads it as Qwen2's tokenizer class, as the hub files do."""
    tokenizer.save_pretrained(folder)
    config_path = Path(folder) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "Qwen2Tokenizer"
    config_path.write_text(json.dumps(config, indent=2))


def tiny_configs(
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    vision_hidden_size: int = 32,
    vision_layers: int = 3,
    vocab_size: int = 512,
    pinpoints: tuple[tuple[int, int], ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)),
    vision_tower: str = "openai/clip-vit-large-patch14-336",
):
    """Qwen2, CLIP-vision and multimodal configs with LongVA's geometry and tiny widths."""
    from transformers import CLIPVisionConfig, Qwen2Config

    from longva_cli.model.config import MultimodalConfig

    language = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=224_000,
        rope_theta=1e9,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        use_sliding_window=False,
        sliding_window=131072,
        bos_token_id=None,
        eos_token_id=483,
    )
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=vision_hidden_size * 2,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=336,
        patch_size=14,
        hidden_act="quick_gelu",
        projection_dim=vision_hidden_size,
    )
    mm = MultimodalConfig(
        vision_tower=vision_tower,
        mm_hidden_size=vision_hidden_size,
        image_grid_pinpoints=pinpoints,
        tokenizer_model_max_length=224_000,
        tunable_parts="mm_vision_tower,mm_mlp_adapter,mm_language_model",
    )
    return language, vision, mm


def write_tiny_checkpoint(folder: Path, *, seed: int = 0, max_shard_size: str | int = "300KB", **sizes) -> Path:
    """A random LongVA checkpoint in the real hub layout, plus its tower config folder.

    The tower's config.json and preprocessor_config.json go to `folder/vision_tower/`, and
    `mm_vision_tower` points there, as a real config points at openai/clip-vit-large-patch14-336.
    """
    import torch

    from longva_cli.model.checkpoint import build_longva, save_longva

    folder = Path(folder)
    tower_folder = folder / "vision_tower"
    language, vision, mm = tiny_configs(vision_tower=str(tower_folder), **sizes)
    torch.manual_seed(seed)
    model = build_longva(language, vision, mm)
    with torch.no_grad():
        # At Qwen2's initial scale (0.02) a tiny LM's attention is nearly uniform: a thousand visual
        # tokens drown the few of the question, and every question gets the same answer. Stronger
        # token embeddings and sharper attention make the answer follow the question, the system
        # prompt and earlier turns, so that a test comparing a reused cache with a cold run notices
        # the wrong prompt (tests/model/test_model.py guards this).
        decoder = model.language_model.model
        decoder.embed_tokens.weight.normal_(0, 0.5)
        for layer in decoder.layers:
            attention = layer.self_attn
            for projection, std in ((attention.q_proj, 0.5), (attention.k_proj, 0.5), (attention.v_proj, 0.3), (attention.o_proj, 0.3)):
                projection.weight.normal_(0, std)
        for param in model.mm_projector.parameters():  # and the frames steer it too
            param.normal_(0, 0.2)
        # Greedy answers never end on their own, so a test can keep a worker busy for as long as it
        # needs: the special tokens' logits are 0, below the best of the hundreds of random rows' for any state.
        tokenizer = build_tiny_tokenizer(language.vocab_size)
        model.language_model.lm_head.weight[tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)] = 0
    save_longva(model, None, folder, max_shard_size=max_shard_size)
    # Written as the released config.json is: a window size with the window switched off, and
    # no `layer_types` (a field of newer transformers), so loading has to derive them.
    config = json.loads((folder / "config.json").read_text())
    config.pop("layer_types", None)
    config.update(sliding_window=131072, use_sliding_window=False, max_window_layers=28)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_tiny_tokenizer(tokenizer, folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [483, 481], "bos_token_id": 481}, indent=2))
    tower_folder.mkdir(exist_ok=True)
    (tower_folder / "config.json").write_text(json.dumps({"model_type": "clip", "vision_config": vision.to_dict()}, indent=2))
    (tower_folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "crop_size": {"height": 336, "width": 336},
                "size": {"shortest_edge": 336},
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "resample": 3,
                "do_center_crop": True,
                "image_processor_type": "CLIPImageProcessor",
            },
            indent=2,
        )
    )
    return folder


def write_tiny_text_model(folder: Path, *, seed: int = 0) -> Path:
    """A random Qwen2 causal LM of `tiny_configs`' language shape with the tiny tokenizer: what
    `niah text`, `eval ppl` and `extend-text` load, in the layout `save_pretrained` writes."""
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    Qwen2ForCausalLM(tiny_configs()[0]).save_pretrained(folder)
    save_tiny_tokenizer(build_tiny_tokenizer(), folder)
    return Path(folder)
