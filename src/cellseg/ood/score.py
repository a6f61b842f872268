"""Out of domain: a trained model scored on annotated images from other labs (``evaluate.ood``), class-agnostic.

A model that scores well on its own lab's test can still miss most nuclei of another lab's slide (issue 31).
Each set of ``evaluate.ood`` is imported as ``cellseg import`` would (polygons, ImageScope XML or mask images,
each image warped to the model's µm/px), then predicted with the tuned thresholds and scored class-agnostic:
every annotated shape is a nucleus, whatever its class, and every predicted nucleus counts whatever its class
(other labs name other classes). A set is never trained on (an error if the training data imported one of its
images) and never tuned on (the thresholds come from the validation split).
The figures are :mod:`cellseg.eval.ood_metrics`'.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from cellseg import CellsegError
from cellseg.data.io import list_train_samples, read_train_sample
from cellseg.eval.nuclei_metrics import Overlaps, count
from cellseg.eval.ood_metrics import OodError, figures, set_summary
from cellseg.importer.classes import REGION, ClassMap
from cellseg.importer.pairs import Source, sources_by_rule, sources_in
from cellseg.importer.run import IMPORT_JSON, import_sources
from cellseg.instances import Instances
from cellseg.nuclei import label_map, truth_label_map
from cellseg.params import OodSet, Params, replace

OVERLAYS = 3
"""Pictures of this many worst images per set (lowest PQ among those with nuclei)."""
OOD_TILE = 4096
"""An image is scored whole up to this side (px at the model's µm/px); a larger annotated region is tiled."""


class AnyNucleus(ClassMap):
    """Every shape that is not a region is a nucleus (class 1), whatever its lab named it."""

    def index(self, name: str | None) -> int | None:
        return REGION if name in self.region_classes else 1


def ood_sources(name: str, spec: OodSet) -> list[Source]:
    """The images of the set with their annotation files (``spec.annotations``: beside, or by rule)."""
    folder = Path(spec.images)
    try:
        return sources_by_rule(folder, spec.annotations) if spec.annotations else sources_in(folder)
    except CellsegError as err:
        raise OodError(f"evaluate.ood.{name}: {err}") from None


def trained_images(raw_dir: str | Path) -> set[Path]:
    """The source images a raw layout was imported from (its ``import.json``; none for a plain layout)."""
    record = Path(raw_dir) / IMPORT_JSON
    if not record.is_file():
        return set()
    return {Path(s["image"]).resolve() for s in json.loads(record.read_text())["samples"]}


def check_not_trained_on(name: str, sources: list[Source], raw_dir: str | Path) -> None:
    """Leave one lab out: an out-of-domain image that the training data was imported from is an error."""
    seen = trained_images(raw_dir)
    both = sorted(str(s.image) for s in sources if s.image.resolve() in seen)
    if both:
        raise OodError(
            f"evaluate.ood.{name}: {len(both)} of its images are in the training data ({raw_dir}/{IMPORT_JSON}), "
            f"e.g. {both[0]}: an out-of-domain set is never trained on; remove it from evaluate.ood or from "
            "data.raw_dir"
        )


def save_worst(folder: Path, shown: list[tuple], rows: list[dict]) -> list[str]:
    """Overlays (truth | nuclei | outcome) of the :data:`OVERLAYS` images of lowest PQ that have nuclei."""
    import dataclasses

    import numpy as np

    from cellseg.eval.nuclei_metrics import MATCH_IOU
    from cellseg.eval.plots import save_overlay

    def one_class(inst: Instances) -> Instances:
        return dataclasses.replace(inst, labels=np.ones(len(inst), np.int64))

    ranked = sorted((i for i, row in enumerate(rows) if row["n_true"]), key=lambda i: (rows[i]["pq"], i))
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i in ranked[:OVERLAYS]:
        image, truth, found = shown[i]
        row = rows[i]
        title = f"{row['sample']}: PQ {row['pq']:.3f}, {row['n_pred']} found / {row['n_true']} true"
        save_overlay(folder / f"{row['sample']}.png", image, one_class(truth), one_class(found), title, 0.0,
                     MATCH_IOU, ("nucleus",))  # fmt: skip
        written.append(row["sample"])
    return written


def score_set(
    name: str,
    spec: OodSet,
    bundle,
    params: Params,
    device,
    progress: bool = True,
    overlays: Path | None = None,
) -> dict:
    """Import the set at the model's µm/px, predict it, score it: ``{"set", "summary", "images": [rows]}``;
    ``overlays``: a folder for pictures of the worst images."""
    from cellseg.infer.predict import predict_image

    sources = ood_sources(name, spec)
    check_not_trained_on(name, sources, params.data.raw_dir)
    ood_params = replace(
        params,
        data=replace(params.data, mpp=bundle.mpp),
        import_=replace(params.import_, tile_size=max(OOD_TILE, params.import_.tile_size)),
    )
    class_map = AnyNucleus(["nucleus"], region_classes=list(params.import_.region_classes))
    rule = bundle.rule
    rows, shown = [], []
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        try:
            record = import_sources(
                sources, raw, ood_params, None, progress, class_map, default_mpp=spec.mpp or None
            )
        except CellsegError as err:
            raise OodError(f"evaluate.ood.{name}: {err}") from None
        origin = {s["sample"]: s for s in record["samples"]}
        for sample in tqdm(list_train_samples(raw, 1), desc=f"ood {name}", unit="img", disable=not progress):
            image, labels = read_train_sample(sample)
            truth = Instances.from_label_rows(labels)
            predicted = predict_image(bundle.network, image, params.predict, device, params.postproc)
            found = label_map(predicted, rule)
            counts = count(Overlaps.of(truth_label_map(truth), found))
            if overlays is not None:
                shown.append((image, truth, found.instances(predicted.scores)))
            rows.append(
                {
                    "sample": sample.name,
                    "image": origin[sample.name]["image"],
                    "annotation": origin[sample.name]["annotation"],
                    "height": int(image.shape[0]),
                    "width": int(image.shape[1]),
                    **figures(counts),
                    **asdict(counts),
                }
            )
    worst = save_worst(overlays, shown, rows) if overlays is not None else []
    return {"set": name, "mpp": bundle.mpp, "summary": set_summary(rows), "images": rows, "overlays": worst}
