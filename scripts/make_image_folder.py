#!/usr/bin/env python3
"""Write a synthetic ImageFolder (`OUT/train/<class>/*.jpg`, `OUT/test/<class>/*.jpg`) for the data
benchmark and the tests: each class is a coloured shape at a random place, size and hue on a noisy
background, so a network can learn something from it; JPEGs at SIZE px.

    python scripts/make_image_folder.py OUT --images 100000 --size 96          # the benchmark's folder
    python scripts/make_image_folder.py OUT --images 60 --size 24 --messy      # every odd case a real folder has

--messy adds, in the train split of the first class: a grey, a palette (with transparency), an RGBA,
a CMYK and a 16-bit image, and a file that is not an image (README.txt, ignored); --corrupt adds a
truncated JPEG.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
from pathlib import Path

import numpy as np

SHAPES = ("disc", "square", "ring", "bar", "cross", "triangle", "frame", "dots", "stripes", "checker")


def draw(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One H x W x 3 uint8 image of class `label`."""
    y, x = np.mgrid[0:size, 0:size] / size
    cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
    d = np.sqrt((y - cy) ** 2 + (x - cx) ** 2)
    shape = SHAPES[label % len(SHAPES)]
    mask = {
        "disc": d < r, "square": (abs(y - cy) < r) & (abs(x - cx) < r), "ring": abs(d - r) < r / 4,
        "bar": abs(y - cy) < r / 3, "cross": (abs(y - cy) < r / 4) | (abs(x - cx) < r / 4),
        "triangle": (y > cy - r) & (abs(x - cx) < (y - cy + r) / 2), "frame": (abs(y - cy) < r) & (abs(x - cx) < r)
        & ~((abs(y - cy) < r / 2) & (abs(x - cx) < r / 2)), "dots": (np.sin(x * 30) * np.sin(y * 30)) > 0.6,
        "stripes": np.sin((x + y) * 25) > 0, "checker": ((x * 8).astype(int) + (y * 8).astype(int)) % 2 == 0,
    }[shape]
    colour = rng.uniform(0.4, 1.0, 3) * 255
    background = rng.uniform(0, 0.3, 3) * 255
    image = np.where(mask[..., None], colour, background) + rng.normal(0, 12, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _write(task: tuple[str, int, int, list[int]]) -> None:
    from PIL import Image

    path, label, size, seed = task
    Image.fromarray(draw(label, size, np.random.default_rng(seed))).save(path, quality=90)


def make_image_folder(out: Path, *, images: int, size: int = 96, classes: int = 10, test_fraction: float = 0.1,
                      seed: int = 0, messy: bool = False, corrupt: bool = False, workers: int | None = None) -> Path:
    """Write `images` JPEGs (train and test together) into `out`; returns `out`."""
    from PIL import Image

    tasks = []
    per_class = max(2, images // classes)
    for label in range(classes):
        test = max(1, round(per_class * test_fraction))
        for split, count in (("train", per_class - test), ("test", test)):
            directory = out / split / f"class_{label:02d}"
            directory.mkdir(parents=True, exist_ok=True)
            tasks += [(str(directory / f"{i:06d}.jpg"), label, size, [seed, label, int(split == "test"), i])
                      for i in range(count)]
    with multiprocessing.get_context("fork").Pool(workers or os.cpu_count()) as pool:
        pool.map(_write, tasks, chunksize=256)
    first = out / "train" / "class_00"
    rng = np.random.default_rng(seed)
    if messy:
        rgb = Image.fromarray(draw(0, size, rng))
        rgb.convert("L").save(first / "grey.png")
        palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        palette.info["transparency"] = 0
        palette.save(first / "palette.png")
        rgba = rgb.convert("RGBA")
        rgba.putalpha(128)
        rgba.save(first / "rgba.png")
        rgb.convert("CMYK").save(first / "cmyk.jpg")
        Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)).save(first / "sixteen_bit.png")
        (first / "README.txt").write_text("not an image: ignored\n")
    if corrupt:
        good = (first / "000000.jpg").read_bytes()
        (first / "truncated.jpg").write_bytes(good[: len(good) // 3])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=100_000, help="JPEGs in all (train and test)")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--messy", action="store_true", help="add grey, palette, RGBA, CMYK, 16-bit and non-image files")
    parser.add_argument("--corrupt", action="store_true", help="add a truncated JPEG")
    args = parser.parse_args()
    make_image_folder(args.out, images=args.images, size=args.size, classes=args.classes, seed=args.seed,
                      messy=args.messy, corrupt=args.corrupt)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
