"""LongVA checkpoints on vLLM: a model plugin that vLLM finds through its entry points.

`pip install 'longva[vllm]'` declares `register` under vLLM's `vllm.general_plugins` group;
vLLM calls it in each process it starts, before it reads a model's config. From then on
`vllm serve lmms-lab/LongVA-7B-DPO` and `vllm.LLM("lmms-lab/LongVA-7B")` load the hub
checkpoints as they are (`architectures: ["LlavaQwenForCausalLM"]`, `model_type: llava_qwen`).

    config.py     the `llava_qwen` config class (Qwen2's, with the `mm_*` fields)
    processor.py  prompt placeholders and pixels, through the native preprocessing
    video.py      videos by path or URL, decoded as `longva ask` decodes them
    model.py      vLLM's CLIP and Qwen2, our projector and pool
"""

from __future__ import annotations

from pathlib import Path

ARCHITECTURE = "LlavaQwenForCausalLM"
MODEL_TYPE = "llava_qwen"
MODEL_CLASS = "longva_cli.vllm.model:LongVAForConditionalGeneration"
# Used when a checkpoint's tokenizer has no chat template (the tiny test checkpoints).
CHAT_TEMPLATE = Path(__file__).with_name("qwen_1_5.jinja")

_registered = False


def register() -> None:
    """Teach transformers and vLLM about LongVA checkpoints (vLLM may call this more than once)."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY
    from vllm.transformers_utils.chat_templates.registry import register_chat_template_fallback_path

    from longva_cli.vllm.config import LlavaQwenConfig
    from longva_cli.vllm.video import BACKEND, LongVAVideoDefault, LongVAVideoLoader

    AutoConfig.register(MODEL_TYPE, LlavaQwenConfig, exist_ok=True)
    # By name: the model module (torch layers) is imported only where a model is built.
    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    VIDEO_LOADER_REGISTRY.register(BACKEND)(LongVAVideoLoader)
    register_chat_template_fallback_path(MODEL_TYPE, CHAT_TEMPLATE)
    MODELS_CONFIG_MAP[ARCHITECTURE] = LongVAVideoDefault
    _registered = True

