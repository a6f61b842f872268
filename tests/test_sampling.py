"""Rare-class repeat-factor sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cellseg.data.io import DataFormatError, save_train_npz
from cellseg.data.sampling import RepeatFactorSampler, classes_present, repeat_factors


def test_repeat_factors_follow_the_lvis_rule() -> None:
    # class 1 in 1 of 4 images, class 2 in all, classes 3-4 in none
    present = np.array([[1, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0]], bool)
    factors = repeat_factors(present, threshold=1.0)
    # class 1: sqrt(1 / 0.25) = 2; class 2: sqrt(1 / 1) = 1
    np.testing.assert_allclose(factors, [2.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(repeat_factors(present, threshold=0.0625), [1.0, 1.0, 1.0, 1.0])
    assert repeat_factors(np.zeros((3, 4), bool), 1.0).tolist() == [1.0, 1.0, 1.0]  # images without nuclei


def test_classes_present_reads_the_prepared_label_rows(tmp_path: Path) -> None:
    labels = np.zeros((4, 8, 8), np.int32)
    labels[0, 1, 1] = 7
    labels[3, 2:4, 2:4] = 1
    save_train_npz(tmp_path / "a.npz", np.zeros((8, 8, 3), np.uint8), labels)
    assert classes_present([tmp_path / "a.npz"], 4).tolist() == [[True, False, False, True]]
    with pytest.raises(DataFormatError, match=r"a\.npz: labels of shape \(4, 8, 8\), but the model learns 6"):
        classes_present([tmp_path / "a.npz"], 6)  # prepared with other `classes`


def test_sampler_draws_in_proportion_reproducibly_and_splits_ranks() -> None:
    weights = np.array([4.0, 1.0, 1.0, 1.0, 1.0])
    sampler = RepeatFactorSampler(weights, seed=3)
    counts = np.zeros(5)
    for epoch in range(400):
        sampler.set_epoch(epoch)
        drawn = list(sampler)
        assert len(drawn) == len(sampler) == 5
        counts += np.bincount(drawn, minlength=5)
    assert counts[0] / counts[1:].mean() == pytest.approx(4.0, rel=0.15)
    sampler.set_epoch(7)
    assert list(sampler) == list(sampler)  # a function of (seed, epoch): resumes see the same images
    ranks = [RepeatFactorSampler(weights, world_size=2, rank=r, seed=3) for r in range(2)]
    assert [len(r) for r in ranks] == [3, 3]
    both = [list(r) for r in ranks]
    single = RepeatFactorSampler(weights, world_size=2, rank=0, seed=3)
    assert both[0] == list(single) and both[0] != both[1]
