"""One model, one rule: ``cellseg predict`` on an image and ``cellseg slide`` on the same pixels as a one-level
slide at the model's µm/px give the same nuclei, however many blocks the slide is cut into.

Two comparisons per image: the nuclei the slide run decided (its block files, before they become polygons)
against ``cellseg predict``'s label maps, mask for mask (IoU ≥ 0.99, same class, scores within float rounding);
and the slide's own ``labels.zarr`` output (polygons filled at pixel centres) against the same label maps.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from cellseg.data.io import class_files, read_image, read_label
from cellseg.data.synth import ImageSpec, generate
from cellseg.slide.synthetic import write_slide
from conftest import ROOT, tiny_params
from slide_helpers import run_slide

CONSEP_TILE = ROOT.parent / "shared" / "datasets" / "consep-dev" / "test_release" / "train_21_005.tif"


def _params(tmp_path):
    """params.yaml of a folder where the commands run: many small blocks, a low threshold (many nuclei and
    overlaps for the rule to settle), no per-image cap (a slide has none)."""
    params = tiny_params(
        predict__label_score_threshold=0.05, predict__max_per_image=3000, slide__block_tiles=1,
        slide__outputs=["geojson", "zarr"], slide__min_tissue_fraction=0.0,
    )  # fmt: skip
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
    return params


def _predicted(folder, shape) -> tuple[np.ndarray, np.ndarray]:
    """``cellseg predict``'s label maps as one id image and the class of each id."""
    ids = np.zeros(shape, np.int64)
    classes = {}
    for k, name in enumerate(class_files(4), start=1):
        if (folder / name).is_file():
            labels = read_label(folder / name, shape)
            ids[labels > 0] = labels[labels > 0]
            classes.update({int(i): k for i in np.unique(labels[labels > 0])})
    return ids, classes


def _match(a: np.ndarray, b: np.ndarray) -> dict[int, tuple[int, float]]:
    """Each id of ``a`` -> (the id of ``b`` it overlaps most, their IoU)."""
    both = (a > 0) & (b > 0)
    pairs, inter = np.unique(np.stack([a[both], b[both]]), axis=1, return_counts=True)
    area_a, area_b = np.bincount(a.ravel()), np.bincount(b.ravel())
    best: dict[int, tuple[int, float]] = {}
    for (i, j), n in zip(pairs.T, inter, strict=True):
        iou = n / (area_a[i] + area_b[j] - n)
        if iou > best.get(int(i), (0, 0.0))[1]:
            best[int(i)] = (int(j), float(iou))
    return best


def _one_to_one(a: np.ndarray, b: np.ndarray, min_iou: float) -> dict[int, int]:
    forward, backward = _match(a, b), _match(b, a)
    ids_a, ids_b = set(np.unique(a)) - {0}, set(np.unique(b)) - {0}
    assert set(forward) == ids_a and set(backward) == ids_b, "a nucleus of one side overlaps nothing"
    pairs = {i: j for i, (j, iou) in forward.items() if backward[j][0] == i and iou >= min_iou}
    worst = min((iou for _, iou in forward.values()), default=1.0)
    assert len(pairs) == len(ids_a) == len(ids_b), (
        f"{len(ids_a)} vs {len(ids_b)} nuclei, worst IoU {worst:.3f}"
    )
    return pairs


def _image(kind: str) -> np.ndarray:
    if kind == "consep":
        if not CONSEP_TILE.is_file():
            pytest.skip(
                f"consep-dev not available at {CONSEP_TILE} (it lives outside the repo, in ../shared)"
            )
        return read_image(CONSEP_TILE)
    image, _ = generate(ImageSpec("train", "s", 300, 340, 90, (0, 1)))
    return image


@pytest.mark.parametrize("kind", ["synthetic", "consep"])
def test_predict_and_slide_give_the_same_nuclei(kind, tiny_project, tmp_path, monkeypatch, capsys) -> None:
    from PIL import Image

    from cellseg.cli import main
    from cellseg.nuclei import NucleusRule

    image = _image(kind)
    params = _params(tmp_path)
    checkpoint = tiny_project["models"] / "best.pt"  # no thresholds.json beside it: params.yaml's own
    (tmp_path / "in").mkdir()
    Image.fromarray(image).save(tmp_path / "in" / "field.png")
    slide = write_slide(tmp_path / "field.tif", *image.shape[:2], 0.25, [(0, 0, image)], levels=1, tile=64)
    monkeypatch.chdir(tmp_path)
    main(["predict", str(checkpoint), "in", "pred"])
    main(["slide", str(checkpoint), str(slide), "--out", "slides", "--no-progress"])
    capsys.readouterr()
    predicted, classes = _predicted(tmp_path / "pred" / "field", image.shape[:2])
    assert len(classes) > 10  # enough nuclei to say something

    # the nuclei the slide decided, exactly (its blocks kept by the runner)
    summary = run_slide(
        slide, checkpoint, tmp_path / "kept", 0.25, params.predict, params.slide, keep_work=True
    )
    assert summary.blocks >= 4  # several blocks: the rule crosses their seams
    from cellseg.slide.assemble import slide_nuclei

    decided = np.zeros(image.shape[:2], np.int64)
    decided_class, scores = {}, {}
    rule = NucleusRule.of(params.predict)
    nid = 0
    for batch in slide_nuclei(summary.work, summary.grid, summary.tissue_blocks, summary.job, rule):
        for (y0, x0), crop, label, score in zip(
            batch.offsets, batch.crops, batch.labels, batch.scores, strict=True
        ):
            nid += 1
            region = decided[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]]
            assert not region[crop].any()  # disjoint across blocks too
            region[crop] = nid
            decided_class[nid], scores[nid] = int(label), float(score)
    pairs = _one_to_one(predicted, decided, min_iou=0.99)
    assert all(classes[i] == decided_class[j] for i, j in pairs.items())

    # what `cellseg slide` wrote: the same nuclei, outlined and filled again
    import zarr

    labels = np.asarray(zarr.open_group(tmp_path / "slides" / "field" / "labels.zarr", mode="r")["0"][:])
    written = _one_to_one(predicted, labels.astype(np.int64), min_iou=0.6)
    features = json.loads((tmp_path / "slides" / "field" / "nuclei.geojson").read_text())["features"]
    assert len(features) == len(written) == len(classes)
    by_id = {f["properties"]["measurements"]["id"]: f["properties"] for f in features}
    assert all(by_id[j]["classification"]["name"] == f"class{classes[i]}" for i, j in written.items())
    slide_scores = sorted(p["measurements"]["score"] for p in by_id.values())
    assert np.allclose(slide_scores, sorted(round(s, 4) for s in scores.values()), atol=2e-3)
