"""Thresholds tuned on validation PQ (the tune stage) and how the other stages read them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cellseg.fsutil import write_json
from cellseg.io import DataFormatError, save_train_npz
from cellseg.thresholds import tune_thresholds, tuned_predict_params, untuned
from conftest import tiny_params
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
    params = tiny_params(
        predict__tune_score_grid=[0.3, 0.45, 0.95], predict__tune_mask_grid=[0.5], predict__tile_size=1024
    ).predict
    tuned = tune_thresholds(LowScoreOracle(), _val_split(tmp_path / "val"), params, torch.device("cpu"))
    assert tuned["tuned"] and tuned["label_score_threshold"] == 0.45 and tuned["mask_threshold"] == 0.5
    pq = {row["label_score_threshold"]: row["pq"] for row in tuned["tried"]}
    assert pq[0.45] > 0.95 and pq[0.3] < pq[0.45] and pq[0.95] == 0.0
    assert tuned["val_pq"] == pq[0.45] and tuned["val_images"] == 3


def test_without_tuning_the_params_values_are_stored(tmp_path: Path) -> None:
    params = tiny_params(predict__tune_thresholds=False, predict__label_score_threshold=0.42).predict
    stored = tune_thresholds(LowScoreOracle(), [], params, torch.device("cpu"))
    assert stored == {"tuned": False, "label_score_threshold": 0.42, "mask_threshold": params.mask_threshold}


def test_stages_read_the_stored_thresholds(tmp_path: Path) -> None:
    params = tiny_params().predict
    path = tmp_path / "thresholds.json"
    write_json(path, {**untuned(params), "label_score_threshold": 0.65, "mask_threshold": 0.4})
    tuned = tuned_predict_params(params, path)
    assert (tuned.label_score_threshold, tuned.mask_threshold) == (0.65, 0.4)
    assert tuned.score_threshold == params.score_threshold  # COCO results keep every detection
    assert tuned_predict_params(params, None) == params


@pytest.mark.parametrize("content", [None, "not json", json.dumps({"mask_threshold": 0.5})])
def test_a_missing_or_broken_thresholds_file_is_named(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "thresholds.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataFormatError, match="thresholds.json"):
        tuned_predict_params(tiny_params().predict, path)
