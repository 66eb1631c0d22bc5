"""LongVA as a vLLM model: vLLM's CLIP tower and Qwen2, our projector, the 2x2 pool.

    pixels [n, 3, 336, 336]           frames of a video, or UniRes crops of an image
      -> CLIP, run up to `mm_vision_select_layer` (-2), CLS dropped     [n, 576, 1024]
      -> projector Linear-GELU-Linear                                   [n, 576, d]
      -> 24x24 grid, 2x2 average pool                                   [n, 144, d]
      -> one item's tokens in a row                                     [n * 144, d]

The same order as `longva_cli.model.modeling` (pool after the projector). The checkpoint loads
as it is on the hub: the tower's weights come from the checkpoint, under
`model.vision_tower.vision_tower.vision_model.*`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.models.clip import CLIPVisionModel
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal, SupportsPP
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from longva_cli.model.checkpoint import PROJECTOR_PREFIX, TOWER_PREFIX
from longva_cli.model.modeling import build_projector
from longva_cli.model.prompt import IMAGE_PLACEHOLDER
from longva_cli.vllm.config import vision_of
from longva_cli.vllm.processor import (
    VIDEO_PLACEHOLDER,
    LongVADummyInputsBuilder,
    LongVAMultiModalProcessor,
    LongVAProcessingInfo,
)

# Frames or crops through the tower at once: a long video is thousands of frames, and the
# tower's activations (577 tokens x 1024 per frame and layer) must not grow with it.
TOWER_BATCH = 32


@MULTIMODAL_REGISTRY.register_processor(
    LongVAMultiModalProcessor,
    info=LongVAProcessingInfo,
    dummy_inputs=LongVADummyInputsBuilder,
)
class LongVAForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsPP):
    """`LlavaQwenForCausalLM` checkpoints (LongVA-7B, LongVA-7B-DPO) on vLLM."""

    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={
            TOWER_PREFIX: "vision_tower.vision_model.",
            PROJECTOR_PREFIX: "mm_projector.",
            "model.": "language_model.model.",
            "lm_head.": "language_model.lm_head.",
        }
    )

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE_PLACEHOLDER
        if modality.startswith("video"):
            return VIDEO_PLACEHOLDER
        raise ValueError(f"LongVA reads images and videos, not {modality}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.vision = vision_of(config)

        with self._mark_tower_model(vllm_config, {"image", "video"}):
            self.vision_tower = CLIPVisionModel(
                self.vision.tower,
                quant_config=vllm_config.quant_config,
                num_hidden_layers_override=self.vision.tower_layers,
                require_post_norm=False,  # features are taken before CLIP's final layer norm
                prefix=maybe_prefix(prefix, "vision_tower"),
            )
            self.mm_projector = build_projector(self.vision.mm, config.hidden_size)

        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=config,
                prefix=maybe_prefix(prefix, "language_model"),
                architectures=["Qwen2ForCausalLM"],
            )

        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """[n, 3, 336, 336] -> [n, 144, d], `TOWER_BATCH` images at a time."""
        return torch.cat([self._encode_batch(batch) for batch in pixels.split(TOWER_BATCH)])

    def _encode_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.vision_tower(pixels, feature_select_strategy="default")  # [b, 576, 1024], CLS dropped
        features = self.mm_projector(features)  # [b, 576, d]
        return self.pool(features)  # [b, 144, d]

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """[b, side*side, d] -> [b, (side/stride)^2, d]: the patch grid pooled in 2D, row-major."""
        batch, tokens, dim = features.shape
        side = int(tokens**0.5)
        grid = features.view(batch, side, side, dim).permute(0, 3, 1, 2)  # [b, d, side, side]
        pool = nn.functional.avg_pool2d if self.vision.mm.pool_mode == "average" else nn.functional.max_pool2d
        pooled = pool(grid, self.vision.mm.pool_stride)  # [b, d, side/2, side/2]
        return pooled.permute(0, 2, 3, 1).reshape(batch, -1, dim)

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """One [images * 144, d] tensor per item: an image's crops, or a video's frames, in order."""
        embeddings: list[torch.Tensor] = []
        for pixels_key, count_key in (("pixel_values", "image_num_crops"), ("pixel_values_videos", "video_num_frames")):
            pixels = kwargs.get(pixels_key)
            if pixels is None:
                continue
            if isinstance(pixels, (list, tuple)):
                pixels = torch.cat(list(pixels))
            counts = torch.as_tensor(kwargs[count_key]).flatten().tolist()
            features = self.encode_pixels(pixels)  # [sum(counts), 144, d]
            embeddings += [item.flatten(0, 1) for item in features.split(counts)]
        return embeddings

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)
