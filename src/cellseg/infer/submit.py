"""The leaderboard submission: every prepared test image predicted and written as COCO RLE results.

``<out>/test-results.json`` and ``<out>/submission.zip`` (:mod:`cellseg.outputs.coco`), with ``image_id`` from
``test_image_name_to_ids.json`` (carried by each prepared test npz). ``<out>/provenance.json``
(:meth:`cellseg.model.bundle.ModelBundle.provenance`) records the checkpoint's sha256, the params it was trained
with, the cellseg version and the inference settings; it stays outside the zip and the results file, whose
formats are fixed. All appear together or not at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cellseg.data.io import DataFormatError, load_npz, visible_files
from cellseg.fsutil import atomic_dir, write_json
from cellseg.infer.predict import predict_images
from cellseg.instances import Instances
from cellseg.model.maskrcnn import CellMaskRCNN
from cellseg.outputs import Nuclei, SinkContext, open_sinks
from cellseg.outputs.coco import ZIP_FILE
from cellseg.params import PostprocParams, PredictParams
from cellseg.provenance import PROVENANCE_FILE


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
) -> Iterator[tuple[TestImage, Instances]]:
    """Every test image with its detections (as COCO results keep them), images fed in size order so that
    equal-sized ones share a forward pass."""
    order = sorted(range(len(tests)), key=lambda i: (tests[i].image.shape, i))
    predictions = predict_images(model, (tests[i].image for i in order), params, device, postproc)
    for i, inst in tqdm(zip(order, predictions, strict=True), total=len(order), desc="submit", unit="img"):
        yield tests[i], inst


def write_submission(
    predictions: Iterable[tuple[TestImage, Instances]], out_dir: str | Path, record: dict | None = None
) -> Path:
    """Write ``test-results.json`` and ``submission.zip`` (the ``coco`` output format), and ``provenance.json``
    from ``record`` when given, atomically; return the zip."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        if record is not None:
            write_json(tmp / PROVENANCE_FILE, record)
        with open_sinks(["coco"], SinkContext(tmp)) as sinks:
            for test, inst in predictions:
                ids = np.arange(1, len(inst) + 1)
                for sink in sinks:
                    sink.add(Nuclei(inst, ids, image_id=test.image_id))
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
    counts: dict[int, int] = {}

    def counted() -> Iterator[tuple[TestImage, Instances]]:
        for test, inst in predict_results(model, tests, params, device, postproc):
            counts[test.image_id] = len(inst)
            yield test, inst

    write_submission(counted(), out_dir, record)
    return {
        "images": len(tests),
        "instances": sum(counts.values()),
        "images_without_instances": sum(n == 0 for n in counts.values()),
    }
