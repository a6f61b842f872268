"""The ``prepare`` stage: raw tifs → one npz per image, a deterministic train/val split and a data summary.

Reading a real sample's tifs (LZW decode, float64 masks, integrality checks) costs far more than loading an npz,
and the training loop reads every sample every epoch. Converting once, losslessly, moves that cost out of the loop.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cellseg.data.io import (
    DataFormatError,
    list_test_images,
    list_train_samples,
    read_image,
    read_train_sample,
    save_test_npz,
    save_train_npz,
)
from cellseg.fsutil import atomic_dir, write_json
from cellseg.params import DataParams

SPLITS = ("train", "val")


def sample_group(name: str, group_regex: str) -> str:
    """The group (source image) of a sample: the regex's first group, or the whole match; the name itself
    when ``group_regex`` is empty or does not match (a sample then forms a group of its own)."""
    if not group_regex:
        return name
    match = re.search(group_regex, name)
    if match is None:
        return name
    return match.group(1) if match.groups() else match.group(0)


def split_train_val(
    names: list[str], val_fraction: float, seed: int, group_regex: str = ""
) -> dict[str, list[str]]:
    """Deterministic split: groups ranked by a hash of (seed, group); the first groups go to val until they
    hold ``round(n·fraction)`` samples.

    A group is a source image (``group_regex`` takes it from the sample name), so tiles of one image never
    straddle the split and validation scores unseen tissue; without a regex every sample is its own group.
    A hash rank (rather than a shuffled list) keeps the assignment of existing samples almost unchanged when
    samples are added, and is the same on every platform and numpy version. At least one group stays in
    train; with a non-zero fraction and two or more groups, at least one goes to val.
    """
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(sample_group(name, group_regex), []).append(name)
    ranked = sorted(groups, key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
    target = round(len(names) * val_fraction)
    if val_fraction > 0 and len(groups) >= 2:
        target = max(target, 1)
    val: set[str] = set()
    for group in ranked[: len(ranked) - 1]:  # the last-ranked group always trains
        if len(val) >= target:
            break
        val.update(groups[group])
    return {"train": sorted(n for n in names if n not in val), "val": sorted(val)}


def _instance_counts(labels: np.ndarray) -> list[int]:
    """Instances per class row: distinct non-zero ids (``np.unique``: ids may be as large as int32 allows)."""
    return [int(np.count_nonzero(np.unique(row))) for row in labels]


def summarize(
    per_image: list[dict], split: dict[str, list[str]], n_test: int, classes: list[str] | tuple[str, ...]
) -> dict:
    """The data summary written to ``metrics/data.json``: what a user checks before training (instances per
    class under the names of ``classes``)."""
    counts = np.array([r["instances"] for r in per_image], dtype=np.int64).reshape(-1, len(classes))
    per_image_total = counts.sum(axis=1)
    heights = np.array([r["height"] for r in per_image])
    widths = np.array([r["width"] for r in per_image])
    return {
        "n_train": len(split["train"]),
        "n_val": len(split["val"]),
        "n_test": n_test,
        "instances": {name: int(c) for name, c in zip(classes, counts.sum(axis=0), strict=True)},
        "instances_total": int(counts.sum()),
        "instances_per_image": {
            "max": int(per_image_total.max()),
            "median": float(np.median(per_image_total)),
            "min": int(per_image_total.min()),
        },
        "images_without_instances": int((per_image_total == 0).sum()),
        "image_height": {
            "min": int(heights.min()),
            "median": float(np.median(heights)),
            "max": int(heights.max()),
        },
        "image_width": {
            "min": int(widths.min()),
            "median": float(np.median(widths)),
            "max": int(widths.max()),
        },
    }


def prepare_dataset(
    raw_dir: str | Path,
    out_dir: str | Path,
    split_path: str | Path,
    summary_path: str | Path,
    params: DataParams,
    classes: list[str] | tuple[str, ...],
) -> dict:
    """Convert ``raw_dir`` into ``out_dir/{train,val,test}/*.npz``; write the split and the summary.

    ``classes``: params.yaml's class names; sample folders hold ``class1.tif .. class<len(classes)>.tif`` and
    the prepared labels have one row per class. All of ``out_dir`` is written to a temporary directory first,
    so a bad file anywhere leaves no output. Returns the summary.
    """
    raw_dir = Path(raw_dir)
    samples = list_train_samples(raw_dir, len(classes))
    tests = list_test_images(raw_dir)  # validates the mapping before any work is done
    split = split_train_val([s.name for s in samples], params.val_fraction, params.seed, params.group_regex)
    split_of = {name: s for s, names in split.items() for name in names}
    per_image = []
    with atomic_dir(out_dir) as tmp:
        for sub in (*SPLITS, "test"):
            (tmp / sub).mkdir()
        for sample in tqdm(samples, desc="prepare train/val", unit="img"):
            image, labels = read_train_sample(sample)
            save_train_npz(tmp / split_of[sample.name] / f"{sample.name}.npz", image, labels)
            per_image.append(
                {"height": image.shape[0], "width": image.shape[1], "instances": _instance_counts(labels)}
            )
        for entry, path in tqdm(tests, desc="prepare test", unit="img"):
            image = read_image(path)
            if image.shape[:2] != (entry.height, entry.width):
                raise DataFormatError(
                    f"{path}: image is {image.shape[0]}×{image.shape[1]} but the mapping says "
                    f"{entry.height}×{entry.width}"
                )
            save_test_npz(tmp / "test" / f"{Path(entry.file_name).stem}.npz", image, entry.image_id)
        summary = summarize(per_image, split, len(tests), classes)
        write_json(
            split_path,
            {
                "seed": params.seed,
                "val_fraction": params.val_fraction,
                "group_regex": params.group_regex,
                **split,
            },
        )
        write_json(summary_path, summary)
    return summary
