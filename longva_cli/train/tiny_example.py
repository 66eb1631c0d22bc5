"""A self-made alignment example for the `align/tiny-cpu` recipe: no hub, no GPU, real formats.

`longva align --make-tiny-example DIR` writes:

    DIR/model/               a tiny random LongVA in the hub layout (`write_tiny_checkpoint`)
    DIR/images/*.png         shapes on coloured backgrounds, in several aspect ratios
    DIR/videos/*.mp4         short H.264 clips of a moving square
    DIR/conversations.json   LLaVA conversations: images, videos, a text-only and a two-turn one
    DIR/captions.json        stage-1 image-caption pairs (the BLIP-558K format)
    DIR/preferences.jsonl    DPO pairs: {"id", "video" | "image", "prompt", "chosen", "rejected"}
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 200, 40)}
IMAGES = [("red", "blue", 200, 120), ("green", "yellow", 120, 200), ("blue", "red", 180, 180), ("yellow", "green", 240, 100)]
VIDEOS = [("red", "green"), ("blue", "yellow")]


def picture(shape: str, background: str, width: int, height: int, shift: int = 0) -> np.ndarray:
    """An RGB image [height, width, 3]: a square of colour `shape` on colour `background`."""
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = COLOURS[background]
    side = min(width, height) // 2
    top, left = (height - side) // 2, (width - side) // 4 + shift % max(1, width - side)
    image[top : top + side, left : left + side] = COLOURS[shape]
    return image


def write_video(path: Path, shape: str, background: str, frames: int = 12, width: int = 96, height: int = 64) -> None:
    """An H.264 clip at 6 frames a second of a `shape` square moving over `background`."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=6)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(picture(shape, background, width, height, shift=index * 3), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def write_tiny_example(folder: Path) -> Path:
    """Write the tiny model and data under `folder` (created); returns the folder, absolute."""
    from PIL import Image

    from longva_cli.model.tiny import write_tiny_checkpoint

    folder = Path(folder).expanduser().resolve()  # config.json names the tower folder: absolute, to load from anywhere
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "videos").mkdir(exist_ok=True)
    write_tiny_checkpoint(folder / "model")
    conversations, captions, preferences = [], [], []
    for i, (shape, background, width, height) in enumerate(IMAGES):
        name = f"{shape}-on-{background}.png"
        Image.fromarray(picture(shape, background, width, height)).save(folder / "images" / name)
        caption = f"A {shape} square on a {background} background."
        captions.append({"id": f"cap-{i}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": caption}]})
        conversations.append({"id": f"img-{i}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": caption}]})
        preferences.append({"id": f"pref-img-{i}", "image": name, "prompt": "<image>\nWhat colour is the square?",
                            "chosen": f"The square is {shape}.", "rejected": f"The square is {background}."})
    for i, (shape, background) in enumerate(VIDEOS):
        name = f"{shape}-moving.mp4"
        write_video(folder / "videos" / name, shape, background)
        conversations.append({"id": f"vid-{i}", "video": name, "conversations": [
            {"from": "human", "value": "<image>\nWhat happens in the video?"},
            {"from": "gpt", "value": f"A {shape} square moves to the right over a {background} background."}]})
        preferences.append({"id": f"pref-vid-{i}", "video": name, "prompt": "<image>\nWhat moves in the video?",
                            "chosen": f"A {shape} square moves.", "rejected": "Nothing moves."})
    conversations.append({"id": "text-0", "conversations": [
        {"from": "human", "value": "What is the special magic Singapore number?"},
        {"from": "gpt", "value": "The special magic Singapore number is: 1234567."}]})
    conversations.append({"id": "two-turns-0", "image": IMAGES[0][0] + "-on-" + IMAGES[0][1] + ".png", "conversations": [
        {"from": "human", "value": "<image>\nWhat shape is it?"}, {"from": "gpt", "value": "A square."},
        {"from": "human", "value": "What colour is it?"}, {"from": "gpt", "value": f"It is {IMAGES[0][0]}."}]})
    (folder / "conversations.json").write_text(json.dumps(conversations, indent=1))
    (folder / "captions.json").write_text(json.dumps(captions, indent=1))
    (folder / "preferences.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preferences))
    return folder
