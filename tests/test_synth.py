"""The synthetic demo dataset: determinism, the raw layout and every quirk of the real files."""

from __future__ import annotations

import json
import runpy
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
from scipy import ndimage

from cellseg.data.io import (
    TEST_DIR,
    TEST_MAPPING,
    class_files,
    list_test_images,
    list_train_samples,
    read_train_sample,
)
from cellseg.data.synth import DENSE_ABOVE, SYNTH_CLASSES, generate, plan_dataset, write_dataset
from cellseg.params import SynthParams, load_params

PARAMS_FILE = Path(__file__).parents[1] / "params.yaml"
SMALL = {"n_train": 6, "n_test": 3, "max_side": 300, "n_dense": 1}


def synth_params(**overrides: object) -> SynthParams:
    """Small synth parameters from the real params.yaml, with ``overrides`` on top."""
    return load_params(
        PARAMS_FILE, overrides={f"synth.{k}": v for k, v in {**SMALL, **overrides}.items()}
    ).synth


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_dataset(out, synth_params())
    return out


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def class_ids(sample_dir: Path) -> dict[int, np.ndarray]:
    """The instance ids of each class file that exists, read straight from the tif."""
    ids = {}
    for k, name in enumerate(class_files(SYNTH_CLASSES), start=1):
        if (sample_dir / name).exists():
            values = np.unique(tifffile.imread(sample_dir / name))
            ids[k] = values[values > 0]
    return ids


# -------------------------------------------------------------------------------------------- determinism
def test_same_seed_gives_byte_identical_files(small_dataset: Path, tmp_path: Path) -> None:
    write_dataset(tmp_path, synth_params())
    assert file_bytes(tmp_path) == file_bytes(small_dataset)


def test_other_seed_gives_other_files(small_dataset: Path, tmp_path: Path) -> None:
    write_dataset(tmp_path, synth_params(seed=1))
    ours, theirs = file_bytes(small_dataset), file_bytes(tmp_path)
    assert set(ours) & set(theirs) == {TEST_MAPPING}  # every sample and test image has another name
    assert not set(ours.values()) & set(theirs.values())  # and other content


# ------------------------------------------------------------------------------------------------ layout
def test_layout_and_names_look_like_the_real_data(small_dataset: Path) -> None:
    samples = sorted((small_dataset / "train").iterdir())
    tests = sorted((small_dataset / TEST_DIR).iterdir())
    assert len(samples) == 6 and len(tests) == 3
    assert sorted(p.name for p in small_dataset.iterdir()) == sorted([TEST_DIR, TEST_MAPPING, "train"])
    for folder in samples:
        assert str(uuid.UUID(folder.name)) == folder.name
        assert (folder / "image.tif").is_file()
        assert {p.name for p in folder.iterdir()} <= {"image.tif", *class_files(SYNTH_CLASSES)}
    for path in tests:
        assert path.suffix == ".tif" and str(uuid.UUID(path.stem)) == path.stem


def test_mapping_matches_the_test_images(small_dataset: Path) -> None:
    rows = json.loads((small_dataset / TEST_MAPPING).read_text())
    assert [r["id"] for r in rows] == [1, 2, 3]
    for row in rows:
        image = tifffile.imread(small_dataset / TEST_DIR / row["file_name"])
        assert image.shape == (row["height"], row["width"], 4)
    entries = list_test_images(small_dataset)
    assert [e.file_name for e, _ in entries] == [r["file_name"] for r in rows]


def test_stage_script_writes_the_dataset_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = yaml.safe_load(PARAMS_FILE.read_text())
    params["synth"].update(n_train=2, n_test=1, max_side=200, n_dense=0)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["synth.py", "data/demo"])
    runpy.run_path(str(PARAMS_FILE.parent / "stages" / "synth.py"), run_name="__main__")
    assert len(list_train_samples(tmp_path / "data" / "demo", SYNTH_CLASSES)) == 2
    assert len(list_test_images(tmp_path / "data" / "demo")) == 1
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["demo"]  # no temporary directory left behind


# -------------------------------------------------------------------------------------------------- quirks
def test_images_are_rgba_uint8_lzw(small_dataset: Path) -> None:
    paths = [*(small_dataset / "train").glob("*/image.tif"), *(small_dataset / TEST_DIR).glob("*.tif")]
    for path in paths:
        with tifffile.TiffFile(path) as tif:
            assert tif.pages[0].compression == 5
        image = tifffile.imread(path)
        assert image.ndim == 3 and image.shape[2] == 4 and image.dtype == np.uint8
        assert (image[..., 3] == 255).all()
        assert image[..., :3].std() > 10  # a picture, not a flat fill


def test_masks_are_float64_with_one_id_counter_across_classes(small_dataset: Path) -> None:
    for folder in (small_dataset / "train").iterdir():
        for name in class_files(SYNTH_CLASSES):
            if (folder / name).exists():
                assert tifffile.imread(folder / name).dtype == np.float64
        ids = class_ids(folder)
        assert ids, f"{folder.name} has no instance"
        runs = [ids[k] for k in sorted(ids)]
        for lower, higher in zip(runs, runs[1:], strict=False):
            assert lower.max() < higher.min()
        every_id = np.concatenate(runs)
        np.testing.assert_array_equal(every_id, np.arange(1, len(every_id) + 1))  # no id lost or skipped


def test_some_class_files_are_absent(small_dataset: Path) -> None:
    absent = [s for s in list_train_samples(small_dataset, SYNTH_CLASSES) if None in s.class_paths]
    assert absent


def test_same_class_instances_touch(small_dataset: Path) -> None:
    """Touching cells of one class share a border in their class file, as in the real data."""
    touching = 0
    for sample in list_train_samples(small_dataset, SYNTH_CLASSES):
        _, labels = read_train_sample(sample)
        for row in labels:
            right, below = (row[:, :-1], row[:, 1:]), (row[:-1], row[1:])
            for a, b in (right, below):
                touching += np.count_nonzero((a > 0) & (b > 0) & (a != b))
    assert touching > 0


def test_reads_back_through_the_raw_reader(small_dataset: Path) -> None:
    for sample in list_train_samples(small_dataset, SYNTH_CLASSES):
        image, labels = read_train_sample(sample)
        assert image.dtype == np.uint8 and image.shape[2] == 3
        assert labels.shape == (SYNTH_CLASSES, *image.shape[:2])
        for k, path in enumerate(sample.class_paths):
            assert (path is None) == (not labels[k].any())


# ----------------------------------------------------------------------------------------- default dataset
def test_default_plan_sizes_and_pixel_budget() -> None:
    params = load_params(PARAMS_FILE).synth
    specs = plan_dataset(params)
    sides = [side for s in specs for side in (s.height, s.width)]
    assert params.min_side <= min(sides) < 1.5 * params.min_side
    assert 0.85 * params.max_side <= max(sides) <= params.max_side
    ordinary = [
        np.sqrt(s.height * s.width) for s in specs if s.target <= DENSE_ABOVE and min(s.height, s.width) > 100
    ]
    assert 150 <= np.median(ordinary) <= 450
    for split, budget in (("train", 8e6), ("test", 2.5e6)):
        assert sum(s.height * s.width for s in specs if s.split == split) <= budget
    test_sides = [side for s in specs if s.split == "test" for side in (s.height, s.width)]
    assert min(test_sides) < 1.5 * params.min_side and max(test_sides) >= 0.85 * params.max_side


def test_default_dense_images_hold_more_than_150_instances() -> None:
    params = load_params(PARAMS_FILE).synth
    dense = [s for s in plan_dataset(params) if s.split == "train" and s.target > DENSE_ABOVE]
    assert len(dense) == params.n_dense
    for spec in dense:
        _, labels = generate(spec)
        assert sum(len(np.unique(row)) - 1 for row in labels) > DENSE_ABOVE


@pytest.mark.slow
def test_default_dataset_is_learnable() -> None:
    """Every class appears often enough to learn, imbalanced like the real data, and the classes look different."""
    params = load_params(PARAMS_FILE).synth
    counts, areas, darkness = np.zeros(SYNTH_CLASSES, int), [[] for _ in range(4)], [[] for _ in range(4)]
    n_dense = n_overlapping = 0
    for spec in plan_dataset(params):
        if spec.split != "train":
            continue
        image, labels = generate(spec)
        n_instances = sum(len(np.unique(row)) - 1 for row in labels)
        assert n_instances > 0
        n_dense += n_instances > DENSE_ABOVE
        n_overlapping += ((labels > 0).sum(0) > 1).any()
        gray = image.mean(-1)
        for k, row in enumerate(labels):
            ids = np.unique(row)[1:]
            counts[k] += len(ids)
            areas[k].extend(ndimage.sum_labels(np.ones_like(row), row, ids))
            darkness[k].extend(ndimage.mean(gray, row, ids))
    assert n_dense == params.n_dense
    assert 0 < n_overlapping < params.n_train / 2  # classes overlap, but rarely
    assert counts.min() >= 40
    assert counts[1] > counts[0] > max(counts[2], counts[3])
    median_area = [np.median(a) for a in areas]
    assert median_area[1] < median_area[2] < median_area[0] and median_area[1] < 120 and median_area[0] > 250
    median_gray = [np.median(d) for d in darkness]
    assert median_gray[1] < median_gray[2] < min(median_gray[0], median_gray[3])  # lymphocytes darkest
