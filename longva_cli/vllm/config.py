"""The `llava_qwen` config class that vLLM needs before it can read a LongVA `config.json`.

transformers has no `llava_qwen` model type, so `AutoConfig` cannot open a LongVA checkpoint.
The hub config is Qwen2's config plus LLaVA's `mm_*` fields: Qwen2's class reads it whole and
keeps the `mm_*` fields as attributes, which `multimodal` turns into our own settings.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import CLIPVisionConfig, Qwen2Config

from longva_cli.model.config import ImageProcessing, MultimodalConfig, multimodal_config, vision_settings


class LlavaQwenConfig(Qwen2Config):
    """Qwen2's config under LongVA's model type; the `mm_*` fields ride along as attributes."""

    model_type = "llava_qwen"


@dataclass(frozen=True)
class VisionSettings:
    """Everything the vision side needs, read once from a LongVA config."""

    mm: MultimodalConfig
    tower: CLIPVisionConfig
    processing: ImageProcessing

    @property
    def tower_layers(self) -> int:
        """CLIP layers to run: features come from `mm.select_layer` (-2: the second-to-last
        layer's output), so the layers after it are never built."""
        layers = self.tower.num_hidden_layers
        return layers + self.mm.select_layer + 1 if self.mm.select_layer < 0 else self.mm.select_layer

    @property
    def tokens_per_image(self) -> int:
        """LM tokens per frame or crop: the patch grid after the 2D pool (24x24 -> 12x12 = 144)."""
        side = self.tower.image_size // self.tower.patch_size
        pooled = -(-side // self.mm.pool_stride)
        return pooled * pooled


def vision_of(config: Qwen2Config) -> VisionSettings:
    """The multimodal settings, CLIP config and preprocessing of a LongVA config (offline)."""
    mm = multimodal_config(config.to_dict())
    tower, processing = vision_settings(mm)
    return VisionSettings(mm, tower, processing)
