"""Regenerate the demo's scribble annotations of the bundled cement CT (run by hand, not imported).

What a user does in a few minutes with a brush: on three z-slices, paint strokes through a few
obviously dark voids (class 1, "void") and through obviously bright cement (class 2, "cement"),
staying away from the boundaries. Here the strokes are random thick lines, kept only where the
smoothed slice is clearly void (< 68) or clearly cement (> 92) after an erosion, so no stroke
touches a boundary. Output: palette PNGs (pixel value = class) and a YAML listing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage as ndi
from skimage.draw import line

HERE = Path(__file__).resolve().parent
SLICES = (24, 64, 104)


def strokes(shape: tuple[int, int], rng: np.random.Generator, n: int = 14, width: int = 2) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for _ in range(n):
        r0, c0, r1, c1 = rng.integers(0, shape[0], 4)
        rr, cc = line(int(r0), int(c0), int(r1), int(c1))
        mask[rr, cc] = True
    return ndi.binary_dilation(mask, iterations=width)


def main() -> None:
    volume = tifffile.imread(HERE / "cement_128x128x128.tif")
    rng = np.random.default_rng(7)
    listing = ["# Scribbles for the demo: see make_cement_scribbles.py. 1 = void, 2 = cement.", "slices:"]
    for z in SLICES:
        smooth = ndi.gaussian_filter(volume[z].astype(np.float32), 1.5)
        void = ndi.binary_erosion(smooth < 68, iterations=1)
        cement = ndi.binary_erosion(smooth > 92, iterations=3)
        paint = strokes(smooth.shape, rng)
        labels = np.zeros(smooth.shape, np.uint8)
        labels[cement & paint] = 2
        labels[ndi.binary_dilation(void & paint, iterations=1) & void] = 1
        labels[void & ~paint & (rng.random(smooth.shape) < 0.6)] = 1  # voids are small: paint them in
        img = Image.fromarray(labels, mode="P")
        img.putpalette([0, 0, 0, 230, 60, 40, 60, 140, 230] + [0, 0, 0] * 253)
        name = f"cement_scribbles_z{z:03d}.png"
        img.save(HERE / name)
        listing.append(f"  - {{axis: z, index: {z}, file: {name}}}")
        print(name, {k: int((labels == k).sum()) for k in (1, 2)})
    (HERE / "cement_scribbles.yaml").write_text("\n".join(listing) + "\n")


if __name__ == "__main__":
    main()
