"""LongVA: transformers' Qwen2ForCausalLM and CLIPVisionModel joined by a small MLP projector.

One encoder path serves every caller (ask, niah, serve, eval, training):

    pixels [n, 3, 336, 336]
      -> CLIP tower, hidden state of layer `select_layer` (-2: before the last layer)
      -> drop CLS                                    [n, 576, 1024]
      -> projector Linear-GELU-Linear                [n, 576, d]
      -> view as 24x24 grid, 2x2 average pool        [n, 144, d]   (row-major)

Pooling comes after the projector, as in the original: the projector is not linear, so the
other order gives other numbers.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionModel, Qwen2ForCausalLM

from longva_cli.model.config import MultimodalConfig


def build_projector(mm: MultimodalConfig, hidden_size: int) -> nn.Sequential:
    """`mlp2x_gelu`: Linear(1024 -> d), GELU, Linear(d -> d); keys `0.*` and `2.*` as in the hub files."""
    layers: list[nn.Module] = [nn.Linear(mm.mm_hidden_size, hidden_size)]
    for _ in range(mm.projector_depth - 1):
        layers += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
    return nn.Sequential(*layers)


class LongVAForCausalLM(nn.Module):
    """The three parts, each a stock module, and the one path that turns pixels into LM tokens."""

    def __init__(
        self,
        language_model: Qwen2ForCausalLM,
        vision_tower: CLIPVisionModel,
        mm_projector: nn.Sequential,
        mm: MultimodalConfig,
    ) -> None:
        super().__init__()
        self.language_model = language_model
        self.vision_tower = vision_tower
        self.mm_projector = mm_projector
        self.mm = mm

    @property
    def config(self):
        return self.language_model.config

    @property
    def device(self) -> torch.device:
        """Where token embeddings live; visual features are moved here to join them."""
        return self.language_model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.mm_projector[0].weight.dtype

    @property
    def tokens_per_image(self) -> int:
        side = self.vision_tower.config.image_size // self.vision_tower.config.patch_size
        pooled = -(-side // self.mm.pool_stride)
        return pooled * pooled

    def encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, 336, 336] preprocessed pixels -> [n, 144, d] visual tokens on `self.device`."""
        tower_param = self.mm_projector[0].weight
        pixels = pixel_values.to(device=tower_param.device, dtype=tower_param.dtype)
        outputs = self.vision_tower(pixel_values=pixels, output_hidden_states=True)
        features = outputs.hidden_states[self.mm.select_layer][:, 1:]  # [n, 576, 1024], CLS dropped
        features = self.mm_projector(features)  # [n, 576, d]
        return self.pool(features).to(self.device)  # [n, 144, d]

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """[n, side*side, d] -> [n, (side/stride)^2, d]: 2D pooling of the patch grid, row-major."""
        n, tokens, dim = features.shape
        side = int(tokens**0.5)
        grid = features.view(n, side, side, dim).permute(0, 3, 1, 2)  # [n, d, side, side]
        pool = nn.functional.avg_pool2d if self.mm.pool_mode == "average" else nn.functional.max_pool2d
        pooled = pool(grid, self.mm.pool_stride)  # [n, d, side/2, side/2]
        return pooled.permute(0, 2, 3, 1).reshape(n, -1, dim)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[seq] token ids -> [seq, d] embeddings."""
        return self.language_model.get_input_embeddings()(input_ids.to(self.device))

    def forward(self, inputs_embeds: torch.Tensor, **kwargs):
        """Language-model forward over ready embeddings [batch, seq, d] (training and scoring)."""
        return self.language_model(inputs_embeds=inputs_embeds, **kwargs)
