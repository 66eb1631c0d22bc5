"""Media in, vLLM prompt and pixels out: LongVA's inputs in vLLM's multimodal processor interface.

The pixels come from the native engine's own code (`longva_cli.model.processing` for CLIP
preprocessing and UniRes, `longva_cli.media` for decoding), so vLLM sees the numbers
`longva ask` sees. Each media item takes one placeholder in the prompt:

    <image>   an image: UniRes crops x 144 tokens (the squashed base image is not encoded)
    <video>   a video: frames x 144 tokens (`<image>` when the prompt has no images, as in
              the original's prompts)

The prompt is tokenised as the native engine tokenises it: the text between placeholders piece
by piece, so byte-pair merges never cross a placeholder.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from functools import cached_property

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.inputs import MultiModalDataDict, MultiModalInput
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageSize, MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    ProcessorInputs,
    PromptReplacement,
    PromptUpdate,
    TimingContext,
)

from longva_cli.model.config import ImageProcessing
from longva_cli.model.processing import preprocess, unires_crops
from longva_cli.model.prompt import IMAGE_PLACEHOLDER, tokenize_segments
from longva_cli.vllm.config import LlavaQwenConfig, VisionSettings, vision_of

VIDEO_PLACEHOLDER = "<video>"
_PLACEHOLDERS = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")


class LongVAProcessor:
    """Pixels for LongVA, computed by the native preprocessing (the "HF processor" vLLM calls).

    Images become their UniRes crops; video frames are preprocessed one by one. Both are
    returned flat, with the number of crops or frames of each item alongside.
    """

    def __init__(self, processing: ImageProcessing, pinpoints: Sequence[tuple[int, int]]) -> None:
        self.processing = processing
        self.pinpoints = pinpoints

    def __call__(self, images: Sequence | None = None, videos: Sequence | None = None, return_tensors: str = "pt") -> BatchFeature:
        data: dict[str, torch.Tensor] = {}
        if images:
            crops = [unires_crops(_as_image(image), self.processing, self.pinpoints)[0] for image in images]
            data["pixel_values"] = torch.cat([preprocess(item, self.processing) for item in crops])  # [crops, 3, 336, 336]
            data["image_num_crops"] = torch.tensor([len(item) for item in crops])
        if videos:
            frames = [preprocess(_frames(video), self.processing) for video in videos]
            data["pixel_values_videos"] = torch.cat(frames)  # [frames, 3, 336, 336]
            data["video_num_frames"] = torch.tensor([len(item) for item in frames])
        return BatchFeature(data, tensor_type=return_tensors)


def _as_image(image) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))


def _frames(video) -> list:
    """A video item (list of PIL frames, [t, h, w, 3] uint8 array or tensor) as a list of frames."""
    if isinstance(video, (list, tuple)) and video and isinstance(video[0], Image.Image):
        return list(video)
    frames = np.asarray(video.cpu() if isinstance(video, torch.Tensor) else video)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"a video must be RGB frames [frames, height, width, 3] of uint8, got {frames.dtype} {list(frames.shape)}")
    return list(frames)


class LongVAProcessingInfo(BaseProcessingInfo):
    """What vLLM asks about LongVA's inputs: supported media, token counts, largest inputs."""

    def get_hf_config(self) -> LlavaQwenConfig:
        return self.ctx.get_hf_config(LlavaQwenConfig)

    @cached_property
    def vision(self) -> VisionSettings:
        return vision_of(self.get_hf_config())

    def get_hf_processor(self, **kwargs: object) -> LongVAProcessor:
        return LongVAProcessor(self.vision.processing, self.vision.mm.image_grid_pinpoints)

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        return {}  # the preprocessing is the original's, with no knobs

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None, "video": None}

    @cached_property
    def placeholder_ids(self) -> dict[str, list[int]]:
        """Each placeholder's tokens when tokenised on its own: what prompt updates look for."""
        tokenizer = self.get_tokenizer()
        return {text: tokenizer.encode(text, add_special_tokens=False) for text in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER)}

    @cached_property
    def feature_id(self) -> int:
        """The token id held by visual positions: any in-vocabulary id works, their embeddings
        are replaced; the pad token keeps it visibly inert in logs."""
        tokenizer = self.get_tokenizer()
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def crop_grid(self, width: int, height: int) -> tuple[int, int]:
        """Crops across and down for a UniRes canvas of (width, height)."""
        crop = self.vision.processing.crop
        return -(-width // crop), -(-height // crop)

    def get_image_size_with_most_features(self) -> ImageSize:
        """The pinpoint with the most crops: an image of that size gets the most tokens."""
        width, height = max(self.vision.mm.image_grid_pinpoints, key=lambda size: np.prod(self.crop_grid(*size)))
        return ImageSize(width=width, height=height)

    def get_num_frames_with_most_features(self, seq_len: int, mm_counts: Mapping[str, int]) -> int:
        """Frames per video when the videos of one prompt fill the whole context: long videos
        are what LongVA is for, so memory is profiled for them."""
        videos = max(mm_counts.get("video", 0), 1)
        return max(seq_len // self.vision.tokens_per_image // videos, 1)


class LongVADummyInputsBuilder(BaseDummyInputsBuilder[LongVAProcessingInfo]):
    """The largest inputs vLLM profiles memory with: the image with the most crops, and videos
    that fill the context."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE_PLACEHOLDER * mm_counts.get("image", 0) + VIDEO_PLACEHOLDER * mm_counts.get("video", 0)

    def get_dummy_mm_data(
        self,
        seq_len: int,
        mm_counts: Mapping[str, int],
        mm_options: MultiModalDummyOptions,
    ) -> MultiModalDataDict:
        image = self.info.get_image_size_with_most_features()
        crop = self.info.vision.processing.crop  # a frame's size does not change its token count
        return {
            "image": self._get_dummy_images(
                width=image.width,
                height=image.height,
                num_images=mm_counts.get("image", 0),
                overrides=mm_options.get("image"),
            ),
            "video": self._get_dummy_videos(
                width=crop,
                height=crop,
                num_frames=self.info.get_num_frames_with_most_features(seq_len, mm_counts),
                num_videos=mm_counts.get("video", 0),
                overrides=mm_options.get("video"),
            ),
        }


class LongVAMultiModalProcessor(BaseMultiModalProcessor[LongVAProcessingInfo]):
    """Preprocesses media with `LongVAProcessor` and gives each item its run of feature tokens."""

    def _get_mm_fields_config(
        self,
        hf_inputs: BatchFeature,
        hf_processor_mm_kwargs: Mapping[str, object],
    ) -> Mapping[str, MultiModalFieldConfig]:
        return dict(
            pixel_values=MultiModalFieldConfig.flat_from_sizes("image", hf_inputs.get("image_num_crops", torch.empty(0))),
            image_num_crops=MultiModalFieldConfig.batched("image", keep_on_cpu=True),
            pixel_values_videos=MultiModalFieldConfig.flat_from_sizes("video", hf_inputs.get("video_num_frames", torch.empty(0))),
            video_num_frames=MultiModalFieldConfig.batched("video", keep_on_cpu=True),
        )

    def apply(self, inputs: ProcessorInputs, timing_ctx: TimingContext) -> MultiModalInput:
        """vLLM's processing, on the prompt re-tokenised as `longva ask` tokenises it."""
        prompt = self.native_tokens(inputs.prompt, inputs.mm_data_items.get_all_counts())
        return super().apply(dataclasses.replace(inputs, prompt=prompt), timing_ctx)

    def native_tokens(self, prompt: list[int], counts: Mapping[str, int]) -> list[int]:
        """The prompt's text pieces between placeholders tokenised one by one, each placeholder
        on its own.

        vLLM tokenised the whole prompt in one go, which lets byte-pair merges cross a
        placeholder (`>\\n` is one Qwen2 token): the model would read other tokens than the ones
        it reads natively.
        """
        tokenizer = self.info.get_tokenizer()
        text = tokenizer.decode(prompt, clean_up_tokenization_spaces=False)
        placeholders = _PLACEHOLDERS.findall(text)
        if not counts.get("image") and VIDEO_PLACEHOLDER not in placeholders:
            placeholders = [VIDEO_PLACEHOLDER] * len(placeholders)  # the original writes <image> for a video
        pieces = tokenize_segments(tokenizer, _PLACEHOLDERS.sub(IMAGE_PLACEHOLDER, text))
        ids = pieces[0].tolist()
        for placeholder, piece in zip(placeholders, pieces[1:]):
            ids += self.info.placeholder_ids[placeholder] + piece.tolist()
        return ids

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        tokens = self.info.vision.tokens_per_image
        feature_id = self.info.feature_id

        def features(modality: str, count_field: str):
            def replacement(item_idx: int) -> list[int]:
                count = int(out_mm_kwargs[modality][item_idx][count_field].data)
                return [feature_id] * (count * tokens)

            return replacement

        targets = self.info.placeholder_ids
        return [
            PromptReplacement(modality="image", target=targets[IMAGE_PLACEHOLDER], replacement=features("image", "image_num_crops")),
            PromptReplacement(modality="video", target=targets[VIDEO_PLACEHOLDER], replacement=features("video", "video_num_frames")),
        ]
