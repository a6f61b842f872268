"""The leaderboard submission: every prepared test image predicted and encoded as a COCO results list.

``<out>/test-results.json`` holds ``[{"image_id", "category_id", "segmentation": {"size": [h, w], "counts": str},
"score", "bbox": [x, y, w, h]}]``, with ``image_id`` from ``test_image_name_to_ids.json`` (carried by each
prepared test npz), and ``<out>/submission.zip`` holds that file at its root under exactly that name, which is
what the leaderboard reads. ``<out>/provenance.json`` (:mod:`cellseg.provenance`) records the checkpoint's
sha256, the params it was trained with, the cellseg version and the inference settings; it stays outside the
zip and the results file, whose formats are fixed. All appear together or not at all.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cellseg.data.io import DataFormatError, load_npz, visible_files
from cellseg.fsutil import atomic_dir, write_json
from cellseg.infer.predict import predict_images
from cellseg.model.maskrcnn import CellMaskRCNN
from cellseg.params import PostprocParams, PredictParams
from cellseg.provenance import PROVENANCE_FILE
from cellseg.rle import to_coco_results

RESULTS_FILE = "test-results.json"
ZIP_FILE = "submission.zip"
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can hold


@dataclass(frozen=True)
class TestImage:
    """A prepared test image and the id its predictions carry in the submission."""

    path: Path
    image: np.ndarray
    image_id: int


def load_test_images(test_dir: str | Path) -> list[TestImage]:
    """Every ``<test_dir>/*.npz`` in ``image_id`` order; missing images, ids or duplicate ids are errors."""
    test_dir = Path(test_dir)
    files = visible_files(test_dir, (".npz",))
    if not files:
        raise DataFormatError(
            f"{test_dir}: no test images (*.npz). The prepare stage writes them from the raw dataset's "
            "test_release/ folder and test_image_name_to_ids.json; does data.raw_dir have them?"
        )
    images = []
    for path in files:
        arrays = load_npz(path)
        if "image" not in arrays or "image_id" not in arrays:
            raise DataFormatError(f"{path}: a test npz needs 'image' and 'image_id' arrays (rerun prepare)")
        images.append(TestImage(path, arrays["image"], int(arrays["image_id"])))
    ids = [t.image_id for t in images]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise DataFormatError(f"{test_dir}: image_id {dupes[:5]} used by more than one test image")
    return sorted(images, key=lambda t: t.image_id)


def predict_results(
    model: CellMaskRCNN,
    tests: list[TestImage],
    params: PredictParams,
    device: torch.device,
    postproc: PostprocParams | None = None,
) -> list[dict]:
    """COCO results rows of every test image, in ``tests`` order.

    Images are fed in size order, so that equal-sized ones share a forward pass.
    """
    order = sorted(range(len(tests)), key=lambda i: (tests[i].image.shape, i))
    predictions = predict_images(model, (tests[i].image for i in order), params, device, postproc)
    rows: dict[int, list[dict]] = {}
    for i, inst in tqdm(zip(order, predictions, strict=True), total=len(order), desc="submit", unit="img"):
        rows[i] = to_coco_results(inst, tests[i].image_id)
    return [row for i in range(len(tests)) for row in rows[i]]


def write_submission(rows: list[dict], out_dir: str | Path, record: dict | None = None) -> Path:
    """Write ``test-results.json`` and ``submission.zip`` (holding it at its root), and ``provenance.json`` from
    ``record`` when given, atomically; return the zip."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        if record is not None:
            write_json(tmp / PROVENANCE_FILE, record)
        results = tmp / RESULTS_FILE
        results.write_text(json.dumps(rows))
        # a fixed timestamp: the same predictions give a byte-identical zip, so DVC sees an unchanged output
        entry = zipfile.ZipInfo(RESULTS_FILE, date_time=ZIP_DATE_TIME)
        entry.compress_type = zipfile.ZIP_DEFLATED
        with zipfile.ZipFile(tmp / ZIP_FILE, "w") as archive:
            archive.writestr(entry, results.read_bytes())
    return out_dir / ZIP_FILE


def submit(
    model: CellMaskRCNN,
    test_dir: str | Path,
    out_dir: str | Path,
    params: PredictParams,
    device: torch.device,
    postproc: PostprocParams | None = None,
    record: dict | None = None,
) -> dict:
    """Predict every test image of ``test_dir`` and write the submission to ``out_dir``; return a summary.

    ``record``: the provenance written beside it (:func:`cellseg.provenance.provenance` and the settings).
    """
    tests = load_test_images(test_dir)
    rows = predict_results(model, tests, params, device, postproc)
    write_submission(rows, out_dir, record)
    found = {row["image_id"] for row in rows}
    return {
        "images": len(tests),
        "instances": len(rows),
        "images_without_instances": sum(t.image_id not in found for t in tests),
    }
