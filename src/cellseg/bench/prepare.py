"""Benchmark: building one sample's training targets from the raw tifs (the reference's way) vs from the npz.

The reference reads the tifs and splits every class file into instances on every access: ``np.unique`` over the
label image, then one full-image comparison and one ``np.where`` per instance for its mask and box. The prepared
path loads the npz once and splits instances inside their bounding boxes (``cellseg.data.dataset.instance_targets``).

    python -m cellseg.bench.prepare [<raw sample folder>] [--repeats N]

Defaults to the real fixture (``../shared/fixtures/hw3-sample/train/sample-image``); without it (a clone
without ``../shared``), to a synthetic demo sample of the same size and density, written as real tifs, and
the output says so.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

from cellseg import DEFAULT_CLASSES
from cellseg.data.dataset import instance_targets
from cellseg.data.io import (
    IMAGE_FILE,
    RawTrainSample,
    class_files,
    load_npz,
    read_train_sample,
    save_train_npz,
)
from cellseg.data.synth import ImageSpec, write_image

FIXTURE = (
    Path(__file__).resolve().parents[4] / "shared" / "fixtures" / "hw3-sample" / "train" / "sample-image"
)


def reference_targets(folder: Path) -> dict[str, torch.Tensor]:
    """The reference's target building: read the tifs, then one full-image mask and ``np.where`` per instance."""
    image = tifffile.imread(folder / IMAGE_FILE)[..., :3]
    masks, boxes, labels = [], [], []
    for k, name in enumerate(class_files(len(DEFAULT_CLASSES)), start=1):
        path = folder / name
        if not path.exists():
            continue
        label_image = tifffile.imread(path)
        for instance_id in np.unique(label_image)[1:]:
            mask = label_image == instance_id
            ys, xs = np.where(mask)
            masks.append(mask)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            labels.append(k)
    return {
        "image": torch.from_numpy(image.copy()),
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": torch.from_numpy(np.stack(masks).astype(np.uint8)),
    }


def npz_targets(path: Path) -> dict[str, torch.Tensor]:
    """The pipeline's way: load the prepared npz, split instances inside their boxes."""
    arrays = load_npz(path)
    return {"image": torch.from_numpy(arrays["image"]), **instance_targets(arrays["labels"])}


def _best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="targets from tifs vs from npz")
    parser.add_argument(
        "folder", nargs="?", type=Path, help="a raw sample folder (default: the real fixture)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as demo:
        folder = args.folder
        if folder is None:
            folder = FIXTURE if (FIXTURE / IMAGE_FILE).exists() else _demo_sample(Path(demo))
        elif not (folder / IMAGE_FILE).exists():
            raise SystemExit(f"{folder}: no {IMAGE_FILE}; pass a raw sample folder")
        _run(folder, args.repeats)


def _demo_sample(out: Path) -> Path:
    """A synthetic sample in the raw format, the size and density of the real fixture (397×482, ~160 cells)."""
    print(f"real fixture not found at {FIXTURE}: using a synthetic demo sample instead")
    spec = ImageSpec("train", "demo-sample", 397, 482, 160, (0, 7))
    write_image(out, spec)
    return out / "train" / spec.name


def _run(folder: Path, repeats: int) -> None:
    sample = RawTrainSample(
        folder.name,
        folder / IMAGE_FILE,
        tuple(folder / f if (folder / f).exists() else None for f in class_files(len(DEFAULT_CLASSES))),
    )
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "sample.npz"
        save_train_npz(npz, *read_train_sample(sample))
        ref, fast = reference_targets(folder), npz_targets(npz)
        order = np.lexsort(ref["boxes"].numpy().T[::-1])  # compare instance sets regardless of order
        order_fast = np.lexsort(fast["boxes"].numpy().T[::-1])
        same = (
            torch.equal(ref["masks"][order], fast["masks"][order_fast])
            and torch.equal(ref["boxes"][order], fast["boxes"][order_fast])
            and torch.equal(ref["labels"][order], fast["labels"][order_fast])
        )
        t_ref = _best_time(lambda: reference_targets(folder), repeats)
        t_npz = _best_time(lambda: npz_targets(npz), repeats)
    h, w = fast["image"].shape[:2]
    print(f"sample: {folder} ({h}x{w}, {len(fast['labels'])} instances)")
    print(f"identical targets: {same}")
    print(f"reference (tifs, per-instance split): {t_ref * 1000:8.1f} ms  (best of {repeats})")
    print(f"prepared (npz, box-local split):      {t_npz * 1000:8.1f} ms  (best of {repeats})")
    print(f"speed-up: {t_ref / t_npz:.1f}x")
    if not same:
        raise SystemExit("targets differ")


if __name__ == "__main__":
    main()
