"""Pathfinder (Linsley et al. 2018, https://arxiv.org/abs/1805.08315) at 32×32, LRA's Pathfinder-32 (Tay et al. 2021
§3.4): are the two dots joined by one dashed path? Read as a sequence of 1,024 pixel intensities.

The generator, written from the paper's description: every image holds `paths` curved dashed contours of
`contour_length` dashes (each `dash` pixels long, `gap` apart), whose heading turns by at most `max_turn` degrees from
one dash to the next (each dash tries a few turns that keep it inside and clear); contours keep a pixel's distance
from each other and the border. Two dots (discs) mark contour ends: a positive image marks both ends of one contour, a
negative one an end of each of two. Both labels draw the same contours, so only the dots' placement tells them apart.
Difficulty is the contour length.

Departures: dashes are rasterised as 1-pixel lines without anti-aliasing (the original renders at a higher
resolution and downsamples); LRA's hard setting draws 14 finer paddles per contour, where at 32 pixels and this
rasterisation 10 dashes of 1.5 pixels (25 pixels of contour, 3 contours) are what fits without crossings — longer
contours fail to fit in most draws. Splits are cached as uint8 arrays (N 32 32) with labels, seeded like ListOps.

    python -m polyformer.domains.longrange.pathfinder --samples domains/longrange/pathfinder_samples.png
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np

SIZE = 32
INK = 255


@dataclass(frozen=True)
class PathfinderSpec:
    """What a generated split is: sizes, contour geometry and seed (its cache file is named after these)."""

    train: int = 160_000  # LRA's Pathfinder: 200,000 images, 80 / 10 / 10
    val: int = 20_000
    test: int = 20_000
    contour_length: int = 10  # dashes per contour (25 pixels of contour at the default dash and gap)
    dash: float = 1.5  # pixels
    gap: float = 1.0
    max_turn: float = 30.0  # degrees between successive dashes
    paths: int = 3  # contours per image, two of them marked
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.train, self.val, self.test) < 1:
            raise ValueError(f"Pathfinder split sizes must be at least 1, found train={self.train}, val={self.val}, "
                             f"test={self.test}")
        if self.paths < 2 or self.contour_length < 1 or self.dash <= 0 or self.gap < 0:
            raise ValueError(f"Pathfinder: expected paths >= 2, contour_length >= 1, dash > 0, gap >= 0, found "
                             f"{self.paths}, {self.contour_length}, {self.dash}, {self.gap}")

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def _dilated(mask: np.ndarray) -> np.ndarray:
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= grown[:, :-1].copy()
    grown[:, :-1] |= grown[:, 1:].copy()
    return grown


def _dash(y: float, x: float, heading: float, length: float, blocked: np.ndarray) -> list[tuple[int, int]] | None:
    """The pixels of a dash from (y, x) along `heading`, or None where it leaves the image or meets `blocked`."""
    pixels = []
    for t in np.linspace(0.0, length, int(length * 4) + 1):
        iy, ix = int(y + t * math.sin(heading)), int(x + t * math.cos(heading))
        if not (1 <= iy < SIZE - 1 and 1 <= ix < SIZE - 1) or blocked[iy, ix]:
            return None
        pixels.append((iy, ix))
    return pixels


def draw_contour(rng: np.random.Generator, spec: PathfinderSpec, taken: np.ndarray, tries: int = 50,
                 turns: int = 8) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]] | None:
    """A contour's pixels (32 32 bool) and its two end points, kept off `taken` and its neighbours; each dash tries
    up to `turns` headings within max_turn of the last. None when no contour fits after `tries` starts."""
    blocked = _dilated(taken)
    for _ in range(tries):
        y, x = rng.uniform(2, SIZE - 2, size=2)
        heading = rng.uniform(0, 2 * math.pi)
        start, pixels = (y, x), np.zeros((SIZE, SIZE), dtype=bool)
        for k in range(spec.contour_length):
            for attempt in range(turns):
                turn = 0.0 if k == 0 and attempt == 0 else math.radians(rng.uniform(-spec.max_turn, spec.max_turn))
                dash = _dash(y, x, heading + turn, spec.dash, blocked)
                if dash is not None:
                    heading += turn
                    break
            if dash is None:
                break
            for iy, ix in dash:
                pixels[iy, ix] = True
            end = (y + spec.dash * math.sin(heading), x + spec.dash * math.cos(heading))
            step = spec.dash + spec.gap
            y, x = y + step * math.sin(heading), x + step * math.cos(heading)
        else:
            return pixels, start, end
    return None


def disc(image: np.ndarray, centre: tuple[float, float], radius: float = 1.3) -> None:
    ys, xs = np.mgrid[0:SIZE, 0:SIZE]
    image[(ys + 0.5 - centre[0]) ** 2 + (xs + 0.5 - centre[1]) ** 2 <= radius ** 2] = INK


def draw_image(rng: np.random.Generator, spec: PathfinderSpec, connected: bool) -> np.ndarray:
    """One 32×32 uint8 image whose dots are (connected=True) or are not joined by a contour."""
    while True:
        taken = np.zeros((SIZE, SIZE), dtype=bool)
        contours = []
        for _ in range(spec.paths):
            contour = draw_contour(rng, spec, taken)
            if contour is None:
                break
            contours.append(contour)
            taken |= contour[0]
        if len(contours) == spec.paths:
            break
    image = np.where(taken, INK, 0).astype(np.uint8)
    first, second = contours[0], contours[1]
    ends = (first[1], first[2]) if connected else (first[1 + rng.integers(2)], second[1 + rng.integers(2)])
    for end in ends:
        disc(image, end)
    return image


def _draw_split(arguments: tuple[PathfinderSpec, int, int]) -> tuple[np.ndarray, np.ndarray]:
    spec, seed, count = arguments
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=count)
    return np.stack([draw_image(rng, spec, bool(label)) for label in labels]), labels.astype(np.int64)


def generate(spec: PathfinderSpec, folder: Path, workers: int = 2) -> dict[str, Path]:
    """The splits as folder/pathfinder-<key>/<split>.npz (images uint8 (N 32 32), labels (N,)), reused when present;
    drawn in chunks of 1,000 from seeds derived from the spec's, so the files do not depend on `workers`."""
    out = folder / f"pathfinder-{spec.key()}"
    paths = {split: out / f"{split}.npz" for split in ("train", "val", "test")}
    if all(path.is_file() for path in paths.values()):
        return paths
    out.mkdir(parents=True, exist_ok=True)
    for index, (split, count) in enumerate((("train", spec.train), ("val", spec.val), ("test", spec.test))):
        chunks = [(spec, spec.seed * 1_000_003 + index * 10_007 + c, min(1000, count - c * 1000))
                  for c in range((count + 999) // 1000)]
        with Pool(workers) as pool:
            parts = pool.map(_draw_split, chunks)
        tmp = paths[split].with_name(f"{split}.{os.getpid()}.tmp.npz")  # concurrent writers replace it whole
        np.savez(tmp, images=np.concatenate([p[0] for p in parts]), labels=np.concatenate([p[1] for p in parts]))
        tmp.replace(paths[split])
    (out / "spec.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
    return paths


def read_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N 32 32), labels (N,)) of a split file; another image size raises naming the file."""
    with np.load(path) as data:
        images, labels = data["images"], data["labels"]
    if images.ndim != 3 or images.shape[1:] != (SIZE, SIZE):
        raise ValueError(f"{path}: expected Pathfinder-32 images (N, {SIZE}, {SIZE}), found shape {images.shape}")
    if len(labels) != len(images) or not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{path}: expected one 0/1 label per image, found {len(labels)} labels for {len(images)} "
                         f"images with values {np.unique(labels)[:5]}")
    return images, labels


def save_samples(path: Path, per_label: int = 4, seed: int = 0) -> None:
    """A picture of `per_label` generated images of each label (the default spec), connected on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng, spec = np.random.default_rng(seed), PathfinderSpec()
    figure, axes = plt.subplots(2, per_label, figsize=(1.6 * per_label, 3.6))
    for row, connected in enumerate((True, False)):
        for axis in axes[row]:
            axis.imshow(draw_image(rng, spec, connected), cmap="gray", vmin=0, vmax=INK)
            axis.set_xticks([])
            axis.set_yticks([])
        axes[row][0].set_ylabel("connected" if connected else "not connected")
    figure.suptitle(f"Pathfinder-32: {spec.paths} contours of {spec.contour_length} dashes, seed {seed}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Pathfinder-32 generator: a picture of samples of both labels")
    parser.add_argument("--samples", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    save_samples(arguments.samples, seed=arguments.seed)
