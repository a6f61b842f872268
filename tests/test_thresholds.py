"""Thresholds tuned on validation PQ (the tune stage) and how the other stages read them."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cellseg.data.io import DataFormatError, save_train_npz
from cellseg.data.maps import center_map
from cellseg.eval.nuclei_metrics import score_split
from cellseg.eval.score_model import load_labelled
from cellseg.eval.tune import tune_thresholds
from cellseg.fsutil import write_json
from cellseg.infer.predict import predict_image
from cellseg.model import bundle
from cellseg.model.thresholds import tuned_postproc_params, tuned_predict_params, untuned
from cellseg.nuclei import DEFAULT_MIN_KEPT_FRACTION, NucleusRule, label_map
from conftest import ROOT, disk_labels, tiny_params
from test_predict import Oracle, paint_cells


class LowScoreOracle(Oracle):
    """The oracle, plus one made-up detection per image at score 0.4 where there is no cell."""

    def detect(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out = []
        for det in super().detect(images):
            out.append(
                {
                    "boxes": torch.cat([det["boxes"], torch.tensor([[0.0, 0, 6, 6]])]),
                    "labels": torch.cat([det["labels"], torch.tensor([2])]),
                    "scores": torch.cat([det["scores"], torch.tensor([0.4])]),
                    "mask_probs": torch.cat([det["mask_probs"], torch.ones(1, 28, 28)]),
                }
            )
        return out


def _val_split(folder: Path) -> list[Path]:
    """Three painted images whose cells keep clear of the top-left corner (where the fake detection sits)."""
    folder.mkdir()
    files = []
    for i in range(3):
        image, ids = paint_cells(np.random.default_rng(10 + i), (70, 80), 6, (5, 7))
        ids[:10, :10] = 0
        image[:10, :10] = 0
        rows = np.stack([np.where((ids > 0) & (ids % 4 + 1 == k), ids, 0) for k in range(1, 5)])
        save_train_npz(folder / f"val-{i}.npz", image, rows)
        files.append(folder / f"val-{i}.npz")
    return files


def test_tuning_picks_the_score_threshold_with_the_best_pq(tmp_path: Path) -> None:
    """Cells score 0.5-0.9 and a false positive 0.4: 0.45 drops it; 0.3 keeps it; 0.95 loses every cell."""
    params = tiny_params(tune__score_grid=[0.3, 0.45, 0.95], tune__mask_grid=[0.5], predict__tile_size=1024)
    tuned = tune_thresholds(
        LowScoreOracle(),
        _val_split(tmp_path / "val"),
        params.predict,
        params.tune,
        torch.device("cpu"),
        4,
    )
    assert tuned["tuned"] and tuned["label_score_threshold"] == 0.45 and tuned["mask_threshold"] == 0.5
    pq = {row["label_score_threshold"]: row["pq"] for row in tuned["tried"]}
    assert pq[0.45] > 0.95 and pq[0.3] < pq[0.45] and pq[0.95] == 0.0
    assert tuned["val_pq"] == pq[0.45] and tuned["val_images"] == 3


def test_without_tuning_the_params_values_are_stored(tmp_path: Path) -> None:
    params = tiny_params(tune__enabled=False, predict__label_score_threshold=0.42)
    stored = tune_thresholds(LowScoreOracle(), [], params.predict, params.tune, torch.device("cpu"), 4)
    assert stored == {
        "tuned": False,
        "label_score_threshold": 0.42,
        "mask_threshold": params.predict.mask_threshold,
    }


def test_stages_read_the_stored_thresholds(tmp_path: Path) -> None:
    params = tiny_params().predict
    path = tmp_path / "thresholds.json"
    write_json(path, {**untuned(params), "label_score_threshold": 0.65, "mask_threshold": 0.4})
    tuned = tuned_predict_params(params, path, 4)
    assert (tuned.label_score_threshold, tuned.mask_threshold) == (0.65, 0.4)
    assert tuned.score_threshold == params.score_threshold  # COCO results keep every detection
    assert tuned_predict_params(params, None, 4) == params


@pytest.mark.parametrize("content", [None, "not json", json.dumps({"mask_threshold": 0.5})])
def test_a_missing_or_broken_thresholds_file_is_named(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "thresholds.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataFormatError, match="thresholds.json"):
        tuned_predict_params(tiny_params().predict, path, 4)


# ----------------------------------------------------------------------------------- the centre-peak threshold
PAIRS = [((16, 14), (16, 27)), ((40, 48), (40, 61)), ((9, 70), (22, 70))]  # touching discs of radius 6
WEAK_PEAK = 0.25  # a trained head's centre probabilities peak about there (CoNSeP)


class WeakHeadsOracle(Oracle):
    """The oracle with auxiliary heads: its centre map is the green channel (peaks of 0.25), its boundary
    map empty. The images paint each touching pair of cells with one id, so it detects them as one."""

    has_aux = True

    def detect(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [
            {**det, "center": im[1].clone(), "boundary": torch.zeros_like(im[1])}
            for det, im in zip(super().detect(images), images, strict=True)
        ]


def _merged_pairs_val(folder: Path, n: int = 2) -> list[Path]:
    """``n`` images of touching pairs, each pair one detection of the oracle but two cells in the truth."""
    folder.mkdir()
    files = []
    for i in range(n):
        shape = (56, 80)
        truth = np.zeros((4, *shape), np.int32)
        image = np.zeros((*shape, 3), np.uint8)
        for pair, (a, b) in enumerate(PAIRS, start=1):
            cells = disk_labels(shape, [a, b], 6, first_id=2 * pair - 1).astype(np.int32)
            truth[pair % 4] += cells  # the oracle's class of detection ``pair``: pair % 4 + 1
            image[..., 0] = np.where(cells > 0, pair, image[..., 0])
            image[..., 2] = np.where(cells > 0, 255, image[..., 2])
        image[..., 1] = np.round(center_map(truth, sigma=2.0) * WEAK_PEAK * 255).astype(np.uint8)
        save_train_npz(folder / f"pairs-{i}.npz", image, truth)
        files.append(folder / f"pairs-{i}.npz")
    return files


def _split_on(**extra):
    params = tiny_params(
        **{
            "tune__score_grid": [0.3, 0.5],
            "tune__mask_grid": [0.4, 0.6],
            "predict__tile_size": 1024,
            "postproc__split": True,
            **extra,
        }
    )
    return params.predict, params.postproc, params.tune


def test_with_a_step_on_and_heads_the_peak_threshold_is_tuned(tmp_path: Path) -> None:
    """At 0.5 no weak peak counts and each merged pair stays one cell (PQ 0); at 0.1 or 0.2 it is split."""
    predict, postproc, tune = _split_on()
    files = _merged_pairs_val(tmp_path / "val")
    model = WeakHeadsOracle()
    tuned = tune_thresholds(model, files, predict, tune, torch.device("cpu"), 4, postproc)
    assert tuned["tuned"] and tuned["peak_threshold"] == 0.1  # the first of the equal best rows
    assert len(model.batches) == len(tune.mask_grid) * len(files)  # once per mask threshold
    combos = [
        (row["mask_threshold"], row["peak_threshold"], row["label_score_threshold"]) for row in tuned["tried"]
    ]
    assert sorted(combos) == sorted(
        (m, p, s) for m in tune.mask_grid for p in tune.peak_grid for s in tune.score_grid
    )
    pq = {
        (r["mask_threshold"], r["peak_threshold"], r["label_score_threshold"]): r["pq"]
        for r in tuned["tried"]
    }
    assert pq[(0.4, 0.1, 0.3)] > 0.8 and pq[(0.4, 0.5, 0.3)] == 0.0 and pq[(0.4, 0.3, 0.3)] == 0.0
    assert tuned["val_pq"] == max(pq.values())


def test_the_tuned_file_reproduces_its_validation_pq(tmp_path: Path) -> None:
    """Predicting as evaluate does, with the stored thresholds, gives the PQ the tune stage recorded."""
    predict, postproc, tune = _split_on()
    files = _merged_pairs_val(tmp_path / "val")
    model = WeakHeadsOracle()
    path = tmp_path / "thresholds.json"
    write_json(path, tune_thresholds(model, files, predict, tune, torch.device("cpu"), 4, postproc))
    run, steps = tuned_predict_params(predict, path, 4), tuned_postproc_params(postproc, path)
    assert steps.peak_threshold == 0.1
    samples = [load_labelled(f, 4) for f in files]
    predictions = [predict_image(model, image, run, "cpu", steps) for image, _ in samples]
    scores = score_split(
        [f.stem for f in files],
        [gt for _, gt in samples],
        predictions,
        NucleusRule(run.label_score_threshold, DEFAULT_MIN_KEPT_FRACTION),
        4,
    )
    assert scores.metrics["pq"] == pytest.approx(json.loads(path.read_text())["val_pq"])


@pytest.mark.parametrize("case", ["steps off", "no heads"])
def test_without_steps_or_heads_the_params_peak_is_stored_at_no_cost(tmp_path: Path, case: str) -> None:
    predict, postproc, tune = _split_on(postproc__split=case == "no heads", postproc__peak_threshold=0.3)
    files = _merged_pairs_val(tmp_path / "val")
    model = WeakHeadsOracle() if case == "steps off" else Oracle()
    tuned = tune_thresholds(model, files, predict, tune, torch.device("cpu"), 4, postproc)
    assert tuned["peak_threshold"] == 0.3
    assert len(tuned["tried"]) == len(tune.mask_grid) * len(tune.score_grid)
    assert {row["peak_threshold"] for row in tuned["tried"]} == {0.3}
    assert len(model.batches) == len(tune.mask_grid) * len(files)


def test_without_tuning_the_params_peak_is_stored(tmp_path: Path) -> None:
    predict, postproc, tune = _split_on(tune__enabled=False, postproc__peak_threshold=0.3)
    stored = tune_thresholds(WeakHeadsOracle(), [], predict, tune, torch.device("cpu"), 4, postproc)
    assert stored == {**untuned(predict), "peak_threshold": 0.3}


def test_stages_read_the_stored_peak_and_scale_the_recovery_threshold(tmp_path: Path) -> None:
    postproc = dataclasses.replace(tiny_params().postproc, peak_threshold=0.5, recover_threshold=0.6)
    path = tmp_path / "thresholds.json"
    write_json(path, {**untuned(tiny_params().predict), "peak_threshold": 0.2})
    tuned = tuned_postproc_params(postproc, path)
    assert tuned.peak_threshold == 0.2 and tuned.recover_threshold == pytest.approx(0.24)
    assert dataclasses.replace(tuned, peak_threshold=0.5, recover_threshold=0.6) == postproc  # nothing else
    assert tuned_postproc_params(postproc, None) == postproc
    same_ratio = dataclasses.replace(postproc, recover_threshold=0.5)
    assert tuned_postproc_params(same_ratio, path).recover_threshold == 0.2  # ratio 1: exactly the peak


def test_a_scaled_recovery_threshold_stays_below_one() -> None:
    postproc = dataclasses.replace(tiny_params().postproc, peak_threshold=0.2, recover_threshold=0.9)
    scaled = postproc.at_peak_threshold(0.5)
    assert 0.99 < scaled.recover_threshold < 1.0


def test_a_file_without_a_peak_keeps_the_params(tmp_path: Path) -> None:
    """A thresholds file written before the peak was tuned still works."""
    postproc = tiny_params().postproc
    path = tmp_path / "thresholds.json"
    write_json(path, {"tuned": True, "label_score_threshold": 0.4, "mask_threshold": 0.5})
    assert tuned_postproc_params(postproc, path) == postproc


@pytest.mark.parametrize("value", ["high", None, 0.0, 1.5, [0.2]])
def test_a_malformed_peak_is_named(tmp_path: Path, value: object) -> None:
    path = tmp_path / "thresholds.json"
    write_json(path, {**untuned(tiny_params().predict), "peak_threshold": value})
    with pytest.raises(DataFormatError, match=r"thresholds\.json.*peak_threshold"):
        tuned_postproc_params(tiny_params().postproc, path)


@pytest.mark.parametrize("content", [None, "not json", "[0.2]"])
def test_a_missing_or_broken_file_is_named_for_the_postproc_too(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "thresholds.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataFormatError, match="thresholds.json"):
        tuned_postproc_params(tiny_params().postproc, path)


@pytest.mark.parametrize("name", ["evaluate", "submit", "predict"])
def test_every_stage_uses_the_stored_peak_threshold(tmp_path: Path, monkeypatch, name: str) -> None:
    """The stages hand the stored peak threshold (and the scaled recovery threshold) to the prediction; the
    model and the prediction itself are stubbed: only the wiring is checked."""
    if name == "predict":  # `cellseg predict`; stages/predict.py forwards to it
        import cellseg.infer.folder as stage
    else:
        spec = importlib.util.spec_from_file_location(f"stage_{name}_peak", ROOT / "stages" / f"{name}.py")
        stage = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(stage)
    params = tiny_params(postproc__split=True, postproc__peak_threshold=0.5, postproc__recover_threshold=0.6)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.to_dict()))
    write_json(tmp_path / "thresholds.json", {**untuned(params.predict), "peak_threshold": 0.2})
    got = {}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bundle, "load_trained_model", lambda *a: (object(), {}))
    monkeypatch.setattr(bundle, "provenance", lambda *a: {})  # no checkpoint file here
    if name == "evaluate":
        monkeypatch.setattr(
            stage, "evaluate_checkpoint", lambda paths, p, device, model: got.update(postproc=p.postproc)
        )
        monkeypatch.setattr(stage, "summary", lambda metrics, class_names: "")
        stage.main(["best.pt", "thresholds.json", "val", "pred", "eval.json", "plots"])
    elif name == "submit":
        monkeypatch.setattr(stage, "submit", lambda *a: got.update(postproc=a[5]) or {})
        stage.main(["best.pt", "thresholds.json", "test", "out"])
    else:
        monkeypatch.setattr(stage, "predict_folder", lambda *a, **kw: got.update(postproc=a[5]) or {})
        stage.main(["best.pt", "in", "out", "--thresholds", "thresholds.json"])
    assert got["postproc"].peak_threshold == 0.2
    assert got["postproc"].recover_threshold == pytest.approx(0.24)


# ------------------------------------------------------------------------------------ per-class thresholds
def _square(size: int, y: int, x: int) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[y : y + 6, x : x + 6] = True
    return mask


def _instances(size: int, entries: list[tuple[int, np.ndarray, float]]):
    from cellseg.instances import Instances

    return Instances(
        size,
        size,
        np.asarray([c for c, _, _ in entries], np.int64),
        np.asarray([s for _, _, s in entries], np.float32),
        np.zeros((len(entries), 2), np.int64),
        [m for _, m, _ in entries],
    )


def test_per_class_tuning_by_hand() -> None:
    """Class 1 (rare) scores 0.15, class 2 0.9 with a false positive at 0.45, no class 3 or 4 in validation:
    at the global 0.5 class 1 is never found; per class it gets 0.1, class 2 keeps the global 0.5 (lower values
    admit the false positive), classes 3 and 4 keep the global one."""
    from cellseg.eval.tune import tune_per_class

    size = 40
    a, b, c, fp = _square(size, 2, 2), _square(size, 2, 20), _square(size, 20, 2), _square(size, 20, 20)
    truth = _instances(size, [(1, a, 1.0), (2, b, 1.0), (2, c, 1.0)])
    pred = _instances(size, [(1, a, 0.15), (2, b, 0.9), (2, c, 0.9), (2, fp, 0.45)])
    params = tiny_params(tune__class_score_grid=[0.1, 0.3, 0.5])
    out = tune_per_class(["t"], [truth], [pred], 0.5, params.predict, params.tune, 4)
    assert out["label_score_threshold_per_class"] == {"1": 0.1, "2": 0.5, "3": 0.5, "4": 0.5}
    assert out["val_mpq_plus_global"] == pytest.approx(0.5)  # class 2 perfect, class 1 PQ 0
    assert out["val_mpq_plus"] == pytest.approx(1.0) and out["val_pq"] == pytest.approx(1.0)
    assert {row["class"] for row in out["class_tried"]} == {1, 2}  # only classes with validation instances


def test_tuning_stores_per_class_thresholds_and_an_empty_grid_turns_them_off(tmp_path: Path) -> None:
    files = _val_split(tmp_path / "val")
    grid = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    params = tiny_params(
        tune__score_grid=[0.3, 0.45, 0.95],
        tune__mask_grid=[0.5],
        tune__class_score_grid=grid,
        predict__tile_size=1024,
    )
    tuned = tune_thresholds(LowScoreOracle(), files, params.predict, params.tune, torch.device("cpu"), 4)
    per_class = tuned["label_score_threshold_per_class"]
    assert set(per_class) == {"1", "2", "3", "4"} and per_class["2"] >= 0.45  # the false positive is class 2
    assert tuned["val_pq"] >= tuned["val_pq_global"]
    off = tiny_params(tune__score_grid=[0.3, 0.45, 0.95], tune__mask_grid=[0.5])
    assert off.tune.class_score_grid == []  # the default: one global threshold (per class lowered test PQ)
    assert "label_score_threshold_per_class" not in tune_thresholds(
        LowScoreOracle(),
        files,
        off.predict,
        off.tune,
        torch.device("cpu"),
        4,
    )


def test_stages_read_per_class_thresholds_and_old_files_keep_the_params(tmp_path: Path) -> None:
    params = tiny_params().predict
    path = tmp_path / "thresholds.json"
    write_json(path, {**untuned(params), "label_score_threshold_per_class": {"1": 0.1, "3": 0.6}})
    tuned = tuned_predict_params(params, path, 4)
    g = params.label_score_threshold
    assert tuned.class_score_thresholds == [0.1, g, 0.6, g]  # a class not named keeps the global one
    assert tuned.label_thresholds == (0.1, g, 0.6, g)
    write_json(path, untuned(params))  # written before per-class tuning
    assert tuned_predict_params(params, path, 4).label_thresholds == g
    own = tiny_params(predict__class_score_thresholds=[0.2, 0.3, 0.4, 0.5]).predict
    assert tuned_predict_params(own, path, 4).class_score_thresholds == [0.2, 0.3, 0.4, 0.5]
    assert untuned(own)["label_score_threshold_per_class"] == {"1": 0.2, "2": 0.3, "3": 0.4, "4": 0.5}
    write_json(path, {**untuned(params), "label_score_threshold_per_class": {"5": 0.1, "6": 0.2}})
    assert tuned_predict_params(params, path, 6).class_score_thresholds == [
        g,
        g,
        g,
        g,
        0.1,
        0.2,
    ]  # six classes
    for bad in ({"5": 0.1}, {"1": 1.5}, [0.1]):
        write_json(path, {**untuned(params), "label_score_threshold_per_class": bad})
        with pytest.raises(DataFormatError, match="thresholds"):
            tuned_predict_params(params, path, 4)


def test_label_maps_apply_per_class_thresholds() -> None:
    from cellseg.nuclei import nuclei
    from cellseg.outputs.label_tifs import class_label_maps

    size = 40
    pred = _instances(size, [(1, _square(size, 2, 2), 0.15), (2, _square(size, 2, 20), 0.4)])
    assert len(label_map(pred, NucleusRule(0.3))) == 1
    assert label_map(pred, NucleusRule((0.1, 0.5, 0.5, 0.5))).classes.tolist() == [1]
    params = tiny_params(predict__class_score_thresholds=[0.1, 0.3, 0.5, 0.5], predict__min_kept_fraction=0.0)
    assert sorted(class_label_maps(nuclei(pred, NucleusRule.of(params.predict)))) == [1, 2]
    with pytest.raises(ValueError, match="class 2 has no score threshold"):
        label_map(pred, NucleusRule((0.1,)))  # per-class thresholds of a one-class model
