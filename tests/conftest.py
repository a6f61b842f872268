"""Shared test helpers: the real fixture's location and small raw datasets written as real tif files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cellseg.data.io import write_image_tif, write_label_tif

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "fixtures" / "hw3-sample"


@pytest.fixture
def real_fixture() -> Path:
    """The real hw3 sample, read in place from ../shared (never copied into the repo)."""
    if not (FIXTURE / "train" / "sample-image" / "image.tif").exists():
        pytest.skip(f"real fixture not available at {FIXTURE} (it lives outside the repo, in ../shared)")
    return FIXTURE


def disk_labels(
    shape: tuple[int, int], centres: list[tuple[int, int]], radius: int, first_id: int
) -> np.ndarray:
    """A label image of discs with consecutive ids from ``first_id``; later discs overwrite earlier ones."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.float64)
    for i, (cy, cx) in enumerate(centres):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = first_id + i
    return labels


def write_raw_train_sample(folder: Path, image: np.ndarray, class_labels: dict[int, np.ndarray]) -> None:
    """Write one sample in the real format; classes missing from ``class_labels`` get no file."""
    folder.mkdir(parents=True, exist_ok=True)
    write_image_tif(folder / "image.tif", image)
    for k, labels in class_labels.items():
        write_label_tif(folder / f"class{k}.tif", labels)


def make_raw_dataset(root: Path, n_train: int = 3, n_test: int = 2, size: tuple[int, int] = (48, 64)) -> Path:
    """A tiny raw dataset with touching discs, a shared id counter across classes and absent class files."""
    rng = np.random.default_rng(0)
    h, w = size
    for i in range(n_train):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        class1 = disk_labels(size, [(12, 12), (12, 21)], 5, first_id=1)  # two touching discs, ids 1-2
        class2 = disk_labels(size, [(30, 40), (36, 50), (10, 55)], 4, first_id=3)  # ids 3-5
        classes = {1: class1, 2: class2} if i % 2 == 0 else {2: class2}  # class1.tif absent on odd samples
        write_raw_train_sample(root / "train" / f"sample-{i:02d}", image, classes)
    (root / "test_release").mkdir(parents=True, exist_ok=True)
    mapping = []
    for i in range(n_test):
        name = f"test-{i:02d}.tif"
        write_image_tif(root / "test_release" / name, rng.integers(0, 256, (h + i, w, 3), dtype=np.uint8))
        mapping.append({"file_name": name, "id": i + 1, "height": h + i, "width": w})
    (root / "test_image_name_to_ids.json").write_text(json.dumps(mapping))
    return root


# ------------------------------------------------------------------------------------- a tiny trained project
TINY = {
    "synth.n_train": 6,
    "synth.n_test": 3,
    "synth.min_side": 40,
    "synth.max_side": 220,
    "synth.n_dense": 0,
    "data.val_fraction": 0.34,
    "maps.n_previews": 1,
    "train.epochs": 1,
    "train.batch_size": 2,
    "train.crop_size": 96,
    "train.eval_every": 1,
    "train.train_eval_images": 1,
    "model.rpn_pre_nms_top_n_test": 300,
    "model.rpn_post_nms_top_n_test": 150,
    "model.box_detections_per_img": 100,
    "predict.max_per_image": 100,
    "predict.tile_size": 128,
    "predict.tile_overlap": 32,
    "evaluate.n_overlays": 1,
}
"""Overrides that make every stage take seconds: small images, one epoch, small caps, tiling exercised."""


def tiny_params(**extra):
    """The repo's params.yaml with :data:`TINY` (and ``extra``: dotted keys with ``__`` for dots) applied."""
    from cellseg.params import load_params

    return load_params(
        ROOT / "params.yaml", overrides={**TINY, **{k.replace("__", "."): v for k, v in extra.items()}}
    )


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory) -> dict:
    """A tiny synthetic dataset, prepared, with maps and a model trained for one epoch (session-scoped).

    Returns the paths (``raw``, ``prepared``, ``maps``, ``models``, ``live``) and ``params``. Tests must not modify it.
    """
    from cellseg.data.maps import write_maps
    from cellseg.data.prepare import prepare_dataset
    from cellseg.data.synth import write_dataset
    from cellseg.fsutil import atomic_dir
    from cellseg.train.loop import TrainPaths, train

    root = tmp_path_factory.mktemp("tiny")
    params = tiny_params()
    with atomic_dir(root / "raw") as tmp:
        write_dataset(tmp, params.synth)
    prepare_dataset(
        root / "raw", root / "prepared", root / "split.json", root / "data.json", params.data, params.classes
    )
    write_maps(root / "prepared", root / "maps", root / "previews", params.maps)
    paths = TrainPaths(root / "prepared", root / "maps", root / "models", root / "live")
    train(params, paths)
    return {
        "root": root,
        "raw": root / "raw",
        "prepared": root / "prepared",
        "maps": root / "maps",
        "models": root / "models",
        "live": root / "live",
        "params": params,
    }


def two_nuclei(scale: float = 2.0, first_id: int = 1):
    """A sinks' batch of two disjoint nuclei: a 4×6 rectangle (class 2) and a plus-shaped one (class 3), in model
    pixels of a 40×50 image."""
    from cellseg.instances import Instances
    from cellseg.outputs import Nuclei

    rect = np.ones((4, 6), bool)
    plus = np.zeros((5, 5), bool)
    plus[2, :] = plus[:, 2] = True
    inst = Instances(
        40,
        50,
        np.array([2, 3]),
        np.array([0.91, 0.55], np.float32),
        np.array([[3, 4], [20, 30]]),
        [rect, plus],
    )
    return Nuclei(inst, np.array([first_id, first_id + 1]), scale=scale, image="img", image_id=7)


def run_verb(verb: str, args, capsys) -> tuple[int, str, str]:
    """``cellseg VERB ARGS --no-progress`` in this process: (exit code, stdout, stderr)."""
    from cellseg.cli import main

    try:
        main([verb, *map(str, args), "--no-progress"])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err
