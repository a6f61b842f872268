"""The ``maps`` stage: per-sample auxiliary targets, a centre heatmap and a boundary map (the reference's definition).

The definition works one instance at a time on full-image masks, which costs instances × area: about 4 s for a
dense 1153×1307 image. The functions here give exactly the same maps in time linear in the area (up to one sort
of the labelled pixels), so the stage stays cheap on the densest and largest images.

``cellseg.bench.maps`` holds the literal definition, times both and checks that they agree; the tests check the
agreement on random label maps and on the real sample.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import ndimage
from skimage.segmentation import find_boundaries
from tqdm import tqdm

from cellseg.data.io import DataFormatError, load_npz, visible_files
from cellseg.fsutil import atomic_dir, save_npz
from cellseg.params import MapsParams

SPLITS = ("train", "val")


# ------------------------------------------------------------------------------------------------ the maps
def compute_maps(labels: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """``(center float32 H×W in [0, 1], boundary uint8 H×W in {0, 1})`` of prepared label rows ``4×H×W``."""
    labels = np.asarray(labels)
    if labels.ndim != 3 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be an integer array of shape (classes, H, W); got {labels.dtype} {labels.shape}"
        )
    return center_map(labels, sigma), boundary_map(labels)


def boundary_map(labels: np.ndarray) -> np.ndarray:
    """Union over every instance of ``binary_dilation(m) ^ binary_erosion(m)`` (scipy defaults), in O(area).

    Why scikit-image's ``find_boundaries(mode="thick", connectivity=1)`` of each label row is exact. Let N(p)
    be the closed cross {p, p±(1,0), p±(0,1)} and m one instance. scipy's defaults give dilation(m) = {p : N(p)
    meets m} and erosion(m) = {p : N(p) ⊆ m}, where a position outside the image is never in m
    (``border_value=0``). Since p ∈ N(p), erosion ⊆ m ⊆ dilation, so the XOR is dilation minus erosion: p is
    boundary of m iff N(p) meets m but is not inside m.

    Take one label row padded with 0 outside the image; its instances are the sets {row == v}, v ≠ 0.
    Claim: p is boundary of some instance of the row iff the 5 values of N(p) are not all equal.
    - Not all equal: some value v ≠ 0 occurs (they are not all 0). Instance v meets N(p), and N(p) is not
      inside it because some position holds another value.
    - All equal to v: for v = 0 no instance meets N(p). For v ≠ 0 no position is outside the image (those
      read 0), so N(p) ⊆ instance v, and v is the only instance meeting N(p).
    "Not all 5 equal" is "the maximum over N(p) differs from the minimum", which is ``find_boundaries``'
    thick mode with the cross footprint; the zero padding gives scipy's ``border_value=0``. This holds
    whatever the ids (shared with other rows, non-connected, one pixel); the union over classes is an OR of
    the rows, which keeps overlapping instances of different classes apart.
    """
    boundary = np.zeros(labels.shape[1:], bool)
    for row in labels:
        boundary |= find_boundaries(np.pad(row, 1), connectivity=1, mode="thick")[1:-1, 1:-1]
    return boundary.astype(np.uint8)


def center_pixels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, cols)`` of ``int(center_of_mass)`` of every instance of every class row, in O(area).

    Exact, not just close: the centre's integer part is floor(Σy / n), computed with integer floor division.
    scipy computes fl(Σy / n) in float64 with exact integer sums (< 2**53), and the division cannot round up
    to the next integer k: Σy / n < k means Σy / n ≤ k - 1/n, a relative gap of at least 1/(n·k) > 1/(H²·W),
    still above 1e-11 for a 5000×5000 image and far above float64's 2**-53 ≈ 1.1e-16.

    Kept rather than ``ndimage.center_of_mass(mask, labels, index)``: on the real sample tiled 2×3 (966
    instances) scipy took 1.5 s against 12 ms here, identical output (issue 13's benchmark).
    """
    width = labels.shape[2]
    rows, cols = [], []
    for row in labels:
        flat = np.flatnonzero(row)
        _, instance = np.unique(row.ravel()[flat], return_inverse=True)
        area = np.bincount(instance)
        y, x = np.divmod(flat, width)
        rows.append(_exact_sum(instance, y) // area)
        cols.append(_exact_sum(instance, x) // area)
    return np.concatenate(rows), np.concatenate(cols)


def _exact_sum(groups: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per-group integer sums; bincount adds in float64, exact for integer totals below 2**53."""
    return np.bincount(groups, weights=values).astype(np.int64)


def center_map(labels: np.ndarray, sigma: float) -> np.ndarray:
    """1.0 at each instance's centre pixel, Gaussian-blurred, divided by its maximum; all zeros without instances."""
    heat = np.zeros(labels.shape[1:], np.float64)
    rows, cols = center_pixels(labels)
    if rows.size == 0:
        return heat.astype(np.float32)
    heat[rows, cols] = 1.0
    heat = ndimage.gaussian_filter(heat, sigma)
    return (heat / heat.max()).astype(np.float32)


# ------------------------------------------------------------------------------------------------ the stage
def list_prepared(prepared_dir: str | Path) -> list[tuple[str, Path]]:
    """``(split, npz path)`` of every prepared train and val sample: train first, names sorted within a split."""
    prepared_dir = Path(prepared_dir)
    samples = []
    for split in SPLITS:
        split_dir = prepared_dir / split
        if not split_dir.is_dir():
            raise DataFormatError(
                f"{split_dir}: missing folder (expected {prepared_dir}/{{train,val}}/<sample>.npz)"
            )
        samples += [(split, p) for p in visible_files(split_dir, (".npz",))]
    if not samples:
        raise DataFormatError(f"{prepared_dir}: no prepared samples in train/ or val/")
    return samples


def read_prepared(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(image, labels)`` of a prepared sample, checked so that a bad file is named rather than crashing later."""
    arrays = load_npz(path)
    missing = [key for key in ("image", "labels") if key not in arrays]
    if missing:
        raise DataFormatError(
            f"{path}: missing array(s) {', '.join(missing)} (has {', '.join(arrays) or 'none'})"
        )
    image, labels = arrays["image"], arrays["labels"]
    # K×H×W, one row per class of `classes` (the maps do not depend on the classes, any K >= 1 will do)
    if labels.ndim != 3 or labels.shape[0] < 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataFormatError(
            f"{path}: labels must be integer K×H×W (K classes), got {labels.dtype} of shape {labels.shape}"
        )
    if image.shape[:2] != labels.shape[1:]:
        raise DataFormatError(f"{path}: image shape {image.shape} does not match labels shape {labels.shape}")
    return image, labels


def write_maps(
    prepared_dir: str | Path, out_dir: str | Path, previews_dir: str | Path, params: MapsParams
) -> int:
    """Write ``out_dir/{train,val}/<sample>.npz`` and the first ``n_previews`` preview PNGs; return the count.

    Both directories are written whole or not at all, so a bad sample leaves neither behind.
    """
    samples = list_prepared(prepared_dir)
    with atomic_dir(out_dir) as maps_tmp, atomic_dir(previews_dir) as previews_tmp:
        for split in SPLITS:
            (maps_tmp / split).mkdir()
        for index, (split, path) in enumerate(tqdm(samples, desc="maps", unit="img")):
            image, labels = read_prepared(path)
            center, boundary = compute_maps(labels, params.center_sigma)
            save_npz(maps_tmp / split / path.name, center=center, boundary=boundary)
            if index < params.n_previews:
                save_preview(
                    previews_tmp / f"{path.stem}.png", image, center, boundary, f"{split}/{path.stem}"
                )
    return len(samples)


def save_preview(path: Path, image: np.ndarray, center: np.ndarray, boundary: np.ndarray, title: str) -> None:
    """Image | centre | boundary side by side, to check at a glance that the maps sit on the cells."""
    figure = Figure(figsize=(13, 4.6), layout="constrained")
    FigureCanvasAgg(figure)
    panels = (
        ("image", image, {}),
        ("centre heatmap", center, {"cmap": "magma", "vmin": 0.0, "vmax": 1.0}),
        ("boundary", boundary, {"cmap": "gray", "vmin": 0, "vmax": 1}),
    )
    for axes, (name, data, style) in zip(figure.subplots(1, 3), panels, strict=True):
        axes.imshow(data, interpolation="nearest", **style)
        axes.set_title(name)
        axes.set_axis_off()
    figure.suptitle(title)
    figure.savefig(path, dpi=100)
