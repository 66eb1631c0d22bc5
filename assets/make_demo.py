"""Re-create assets/demo.mp4: an 8-second clip of a red ball bouncing across a field.

    python assets/make_demo.py
"""

from pathlib import Path

import av
import numpy as np

WIDTH, HEIGHT, FPS, SECONDS = 320, 240, 15, 8


def scene(t: float) -> np.ndarray:
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    frame = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    frame[:] = (110, 170, 235)  # sky
    frame[y > 170] = (60, 150, 60)  # grass
    cx = 20 + (WIDTH - 40) * (t / SECONDS)
    cy = 150 - abs(np.sin(t * 2.2)) * 100
    frame[(x - cx) ** 2 + (y - cy) ** 2 < 15**2] = (220, 30, 30)  # the ball
    return frame


def main() -> None:
    path = Path(__file__).with_name("demo.mp4")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for index in range(FPS * SECONDS):
            frame = av.VideoFrame.from_ndarray(scene(index / FPS), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


if __name__ == "__main__":
    main()
