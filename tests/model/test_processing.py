"""Preprocessing and UniRes geometry: every number of facts section 2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from longva_cli.media import frame_ids_at_fps, uniform_frame_ids
from longva_cli.model.config import ImageProcessing
from longva_cli.model.processing import (
    expand_to_square,
    preprocess,
    resize_and_pad,
    select_best_resolution,
    split_into_crops,
    unires_crops,
)

CLIP = ImageProcessing()
LONGVA_DPO_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def random_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_clip_constants_are_the_originals():
    assert CLIP.resize == 336 and CLIP.crop == 336
    assert CLIP.mean == (0.48145466, 0.4578275, 0.40821073)
    assert CLIP.std == (0.26862954, 0.26130258, 0.27577711)
    assert CLIP.mean_color == (122, 116, 104)


@pytest.mark.parametrize("size", [(640, 360), (360, 640), (500, 500), (337, 1000), (100, 80)])
def test_preprocess_matches_transformers_clip_processor(size):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    reference = CLIPImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, resample=Image.BICUBIC
    )
    frames = [random_image(*size, seed=s) for s in range(3)]
    expected = reference(images=frames, return_tensors="pt")["pixel_values"]
    ours = preprocess(frames, CLIP)
    assert ours.shape == (3, 3, 336, 336) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_resize_keeps_the_long_side_truncated_and_crops_the_centre():
    # 1000x337: short side 337 -> 336, long side int(336 * 1000 / 337) = 997; crop offset (997-336)//2.
    image = random_image(1000, 337)
    resized = np.asarray(Image.fromarray(image).resize((997, 336), resample=Image.BICUBIC))
    left = (997 - 336) // 2
    expected = (torch.from_numpy(resized[:, left : left + 336].copy()).double() / 255).float()
    mean, std = torch.tensor(CLIP.mean), torch.tensor(CLIP.std)
    expected = ((expected - mean) / std).permute(2, 0, 1)
    torch.testing.assert_close(preprocess([image], CLIP)[0], expected, rtol=0, atol=1e-6)


def test_expand_to_square_pads_with_the_clip_mean_colour_centred():
    image = Image.new("RGB", (40, 20), (255, 255, 255))
    square = expand_to_square(image, CLIP.mean_color)
    assert square.size == (40, 40)
    assert square.getpixel((0, 0)) == (122, 116, 104)
    assert square.getpixel((0, 10)) == (255, 255, 255)  # pasted at (40 - 20) // 2 = 10
    assert square.getpixel((0, 9)) == (122, 116, 104)
    assert square.getpixel((0, 30)) == (122, 116, 104)
    tall = expand_to_square(Image.new("RGB", (21, 40), (0, 0, 0)), CLIP.mean_color)
    assert tall.getpixel((9, 5)) == (0, 0, 0) and tall.getpixel((8, 5)) == (122, 116, 104)  # offset 19 // 2


def test_uniform_frame_ids_are_floored_linspace_with_duplicates():
    assert uniform_frame_ids(100, 5) == [0, 24, 49, 74, 99]
    assert uniform_frame_ids(100, 5) == np.linspace(0, 99, 5, dtype=int).tolist()
    assert uniform_frame_ids(3, 5) == [0, 0, 1, 1, 2]
    assert uniform_frame_ids(1, 3) == [0, 0, 0]


def test_fps_sampling_takes_every_rounded_fps_frame():
    assert frame_ids_at_fps(100, 29.97, 1.0) == [0, 30, 60, 90]
    assert frame_ids_at_fps(100, 25.0, 2.0) == list(range(0, 100, 12))
    assert frame_ids_at_fps(100, 30.0, 1.0, max_frames=4) == [0, 30, 60, 90]  # the cap is not reached
    assert frame_ids_at_fps(100, 30.0, 1.0, max_frames=2) == [0, 99]  # reached: spread over the whole video


def test_best_resolution_keeps_most_pixels_then_wastes_least():
    assert select_best_resolution((1000, 500), LONGVA_DPO_PINPOINTS) == (672, 336)
    assert select_best_resolution((500, 1000), LONGVA_DPO_PINPOINTS) == (336, 672)
    assert select_best_resolution((900, 900), LONGVA_DPO_PINPOINTS) == (672, 672)
    assert select_best_resolution((3000, 1000), LONGVA_DPO_PINPOINTS) == (1008, 336)
    # A small image fits every canvas whole: the least wasted area wins.
    assert select_best_resolution((100, 100), LONGVA_DPO_PINPOINTS) == (336, 672)


def test_best_resolution_uses_truncated_sizes():
    # 1000x333 into 672x336: scale 0.672 -> int(672.0) x int(223.776) = 672 x 223.
    # into 1008x336: scale 1.008 -> 1008 x int(335.66) = 335; effective capped at 333000.
    assert select_best_resolution((1000, 333), ((672, 336), (1008, 336))) == (1008, 336)


def test_resize_and_pad_fills_one_side_and_centres_on_black():
    image = Image.new("RGB", (1000, 500), (255, 255, 255))
    padded = resize_and_pad(image, (672, 672))
    assert padded.size == (672, 672)
    # width fills: 672 x min(ceil(500 * 0.672), 672) = 672 x 336, pasted at y = (672 - 336) // 2 = 168
    assert padded.getpixel((0, 167)) == (0, 0, 0)
    assert padded.getpixel((0, 168)) == (255, 255, 255)
    assert padded.getpixel((0, 503)) == (255, 255, 255)
    assert padded.getpixel((0, 504)) == (0, 0, 0)


def test_crops_are_cut_row_by_row():
    canvas = Image.new("RGB", (1008, 672))
    for index, (left, top) in enumerate([(x, y) for y in (0, 336) for x in (0, 336, 672)]):
        canvas.paste((index, 0, 0), (left, top, left + 336, top + 336))
    crops = split_into_crops(canvas, 336)
    assert [c.size for c in crops] == [(336, 336)] * 6
    assert [c.getpixel((5, 5))[0] for c in crops] == [0, 1, 2, 3, 4, 5]


def test_unires_gives_the_grid_of_the_best_pinpoint():
    crops, grid = unires_crops(Image.new("RGB", (900, 900)), CLIP, LONGVA_DPO_PINPOINTS)
    assert grid == (672, 672) and len(crops) == 4
