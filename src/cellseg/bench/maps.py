"""Benchmark: the linear-time maps of ``cellseg.data.maps`` vs the literal per-instance definition, on a dense scene.

The scene is the real sample's labels tiled 2×3 with ids renumbered per tile (about 794×1446 pixels, 966
instances), or, without the fixture, a synthetic 1000×1000 field of touching discs (400 instances).

    python -m cellseg.bench.maps [--fixture DIR]

``reference_maps`` is the one copy of the definition: the tests compare the fast maps against it too.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from cellseg import DEFAULT_CLASSES
from cellseg.data.io import list_train_samples, read_train_sample
from cellseg.data.maps import compute_maps

FIXTURE = Path(__file__).resolve().parents[4] / "shared" / "fixtures" / "hw3-sample"
SIGMA = 5.0
BENCH_CLASSES = len(DEFAULT_CLASSES)  # the hw3 fixture's (class1..class4); the synthetic labels use as many
TILES = (2, 3)
FAST_RUNS = 3
REFERENCE_RUNS = 1
T = TypeVar("T")


def reference_maps(labels: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """The reference's definition word for word: one full-image mask per instance, scipy's morphology and centre of mass."""
    heat = np.zeros(labels.shape[1:], np.float64)
    boundary = np.zeros(labels.shape[1:], np.uint8)
    for row in labels:
        for instance_id in np.unique(row[row != 0]):
            mask = row == instance_id
            cy, cx = ndimage.center_of_mass(mask)
            heat[int(cy), int(cx)] = 1.0
            edge = ndimage.binary_dilation(mask) ^ ndimage.binary_erosion(mask)
            boundary = np.maximum(boundary, edge.astype(np.uint8))
    if not heat.any():
        return heat.astype(np.float32), boundary
    center = ndimage.gaussian_filter(heat, sigma)
    return (center / center.max()).astype(np.float32), boundary


def tiled_fixture(fixture: Path, tiles: tuple[int, int] = TILES) -> np.ndarray:
    """The fixture's label rows tiled ``rows × cols``; each tile's ids are shifted so that they stay distinct."""
    _, labels = read_train_sample(list_train_samples(fixture, BENCH_CLASSES)[0])
    shift = int(labels.max())
    copies = [
        [np.where(labels > 0, labels + shift * (r * tiles[1] + c), 0) for c in range(tiles[1])]
        for r in range(tiles[0])
    ]
    return np.concatenate([np.concatenate(row, axis=2) for row in copies], axis=1).astype(np.int32)


def synthetic_scene(size: int = 1000, spacing: int = 50, seed: int = 0) -> np.ndarray:
    """Jittered discs of radius 0.6·spacing cut by their Voronoi cells: dense, touching, classes by id."""
    rng = np.random.default_rng(seed)
    grid = np.arange(spacing // 2, size, spacing)
    centres = np.stack(np.meshgrid(grid, grid, indexing="ij"), axis=-1).reshape(-1, 2)
    centres = centres + rng.uniform(-spacing / 6, spacing / 6, centres.shape)
    pixels = np.indices((size, size)).reshape(2, -1).T
    distance, nearest = cKDTree(centres).query(pixels)
    ids = np.where(distance < 0.6 * spacing, nearest + 1, 0).reshape(size, size)
    labels = np.zeros((BENCH_CLASSES, size, size), np.int32)
    for k in range(BENCH_CLASSES):
        labels[k] = np.where((ids > 0) & (ids % BENCH_CLASSES == k), ids, 0)
    return labels


def timed(function: Callable[[], T], runs: int) -> tuple[float, T]:
    """Best wall time of ``runs`` calls (the least disturbed by other work) and the last call's result."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return min(times), result


def instance_count(labels: np.ndarray) -> int:
    return sum(len(np.unique(row[row != 0])) for row in labels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--fixture", type=Path, default=FIXTURE, help="raw dataset with train/<sample>/ folders"
    )
    args = parser.parse_args(argv)
    if (args.fixture / "train").is_dir():
        labels, scene = tiled_fixture(args.fixture), f"{args.fixture.name} tiled {TILES[0]}×{TILES[1]}"
    else:
        labels, scene = synthetic_scene(), "synthetic touching discs (fixture not found)"
    print(f"scene: {scene}, {labels.shape[1]}×{labels.shape[2]} px, {instance_count(labels)} instances")

    reference_s, reference = timed(lambda: reference_maps(labels, SIGMA), REFERENCE_RUNS)
    fast_s, fast = timed(lambda: compute_maps(labels, SIGMA), FAST_RUNS)
    boundary_equal = np.array_equal(fast[1], reference[1])
    center_error = float(np.abs(fast[0] - reference[0]).max())
    print(f"reference (per instance, {REFERENCE_RUNS} run): {reference_s:8.3f} s")
    print(f"fast (linear, best of {FAST_RUNS}):      {fast_s:8.3f} s")
    print(f"speed-up: {reference_s / fast_s:.0f}×")
    print(f"boundary identical: {boundary_equal}; centre max |diff|: {center_error:.1e}")
    if not boundary_equal or center_error > 1e-6:
        raise SystemExit("MISMATCH: the fast maps differ from the reference")


if __name__ == "__main__":
    main()
