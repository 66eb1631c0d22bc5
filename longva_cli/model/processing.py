"""Pixels in, CLIP-ready tensors out: the original's preprocessing, reproduced value for value.

`preprocess` matches transformers' CLIPImageProcessor (PIL path) bit for bit: shortest edge
to 336 with PIL bicubic (long side `int(336 * long / short)`), centre crop with floor offsets,
rescale in float64 then cast to float32, normalise in float32. Its speed comes from two
things: a uint8 pixel has only 256 values, so rescale + normalise is a table look-up computed
once with the same float operations; and each image is resized and looked up on a thread
pool (PIL and numpy release the GIL), writing straight into the output batch.
"""

from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from longva_cli.model.config import ImageProcessing

_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="longva-resize")


def expand_to_square(image: Image.Image, color: tuple[int, int, int]) -> Image.Image:
    """Pad to a square with `color`, the original image centred (V-NIAH's `expand2square`)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), color)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


@functools.lru_cache(maxsize=8)
def normalisation_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """[3, 256] float32: the normalised value of each uint8 level in each channel."""
    levels = (torch.arange(256, dtype=torch.float64) * (1 / 255)).float()  # rescale as CLIP does
    table = (levels[None, :] - torch.tensor(mean)[:, None]) / torch.tensor(std)[:, None]
    return table.numpy()


def _resize_and_crop(image: Image.Image | np.ndarray, settings: ImageProcessing, square_color) -> np.ndarray:
    """One image -> [crop, crop, 3] uint8."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    if square_color is not None:
        image = expand_to_square(image, square_color)
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_short, new_long = settings.resize, int(settings.resize * long / short)
    size = (new_short, new_long) if width <= height else (new_long, new_short)
    image = image.resize(size, resample=Image.BICUBIC)
    array = np.asarray(image)
    top = (array.shape[0] - settings.crop) // 2
    left = (array.shape[1] - settings.crop) // 2
    return array[top : top + settings.crop, left : left + settings.crop]


def preprocess(
    images: Sequence[Image.Image | np.ndarray],
    settings: ImageProcessing,
    pad_to_square: bool = False,
) -> torch.Tensor:
    """RGB images (PIL or HxWx3 uint8 arrays) -> float32 pixel values [n, 3, crop, crop].

    `pad_to_square` first pads each image to a square of the mean colour, as V-NIAH does.
    """
    color = settings.mean_color if pad_to_square else None
    table = normalisation_table(tuple(settings.mean), tuple(settings.std))
    out = np.empty((len(images), 3, settings.crop, settings.crop), dtype=np.float32)

    def fill(index: int) -> None:
        pixels = _resize_and_crop(images[index], settings, color)  # [crop, crop, 3] uint8
        for channel in range(3):
            np.take(table[channel], pixels[..., channel], out=out[index, channel])

    list(_POOL.map(fill, range(len(images))))
    return torch.from_numpy(out)  # [n, 3, crop, crop]


# ---- UniRes (LLaVA-NeXT "anyres" with LongVA's "unires" merge) -----------------------------


def select_best_resolution(size: tuple[int, int], pinpoints: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The (w, h) pinpoint that keeps the most of the image's pixels, then wastes the least."""
    width, height = size
    best, best_effective, best_wasted = None, 0, math.inf
    for target_w, target_h in pinpoints:
        scale = min(target_w / width, target_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = target_w * target_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (target_w, target_h), effective, wasted
    return best


def resize_and_pad(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Fit inside `target` keeping the aspect ratio, centred on black."""
    width, height = image.size
    target_w, target_h = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        new_w, new_h = target_w, min(math.ceil(height * scale_w), target_h)
    else:
        new_w, new_h = min(math.ceil(width * scale_h), target_w), target_h
    canvas = Image.new("RGB", (target_w, target_h), (0, 0, 0))
    canvas.paste(image.resize((new_w, new_h)), ((target_w - new_w) // 2, (target_h - new_h) // 2))
    return canvas


def split_into_crops(image: Image.Image, crop: int) -> list[Image.Image]:
    """Square crops of side `crop`, row by row, left to right."""
    width, height = image.size
    return [image.crop((left, top, left + crop, top + crop)) for top in range(0, height, crop) for left in range(0, width, crop)]


def unires_crops(image: Image.Image, settings: ImageProcessing, pinpoints) -> tuple[list[Image.Image], tuple[int, int]]:
    """The crops whose features stand for an image, and the grid size (w, h) they tile.

    The original also squashes the whole image to 336x336 and encodes it, then discards its
    features under the "unires" merge: we skip that work, the output is the same.
    """
    image = image.convert("RGB")
    best = select_best_resolution(image.size, pinpoints)
    return split_into_crops(resize_and_pad(image, best), settings.crop), best
