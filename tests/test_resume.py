"""Resume rules: the AMP scaler, per-rank random states, and params that changed since the checkpoint."""

from __future__ import annotations

import math
import random
import shutil
from pathlib import Path

import pytest
import torch

from cellseg.model.checkpoint import (
    ResumeError,
    load_checkpoint,
    restore_scaler,
    resume_changes,
    rng_state,
    set_rng_state,
)
from cellseg.train.loop import LAST, TrainPaths, cosine_from, train
from conftest import tiny_params


def test_resuming_with_fp16_from_a_run_without_it_starts_a_fresh_scale() -> None:
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    note = restore_scaler(scaler, {})  # what a disabled scaler saved
    assert "without fp16 loss scaling" in note and scaler.get_scale() == 65536.0
    saved = torch.amp.GradScaler("cpu", enabled=True, init_scale=8.0).state_dict()
    assert restore_scaler(scaler, saved) is None and scaler.get_scale() == 8.0
    assert "not needed" in restore_scaler(torch.amp.GradScaler("cpu", enabled=False), saved)


def test_each_rank_gets_its_own_random_state_and_extra_ranks_reseed() -> None:
    torch.manual_seed(1)
    random.seed(1)
    first = rng_state()
    torch.manual_seed(2)
    random.seed(2)
    second = rng_state()
    expected = torch.rand(3), random.random()

    assert set_rng_state([first, second], rank=1, seed=0) is None
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]

    note = set_rng_state([first, second], rank=2, seed=7)  # a third rank the saving run did not have
    assert "rank 2 starts a fresh stream" in note
    drawn = torch.rand(3)
    torch.manual_seed(7 + 2)  # seeded by (seed, rank)
    assert torch.equal(drawn, torch.rand(3))
    assert set_rng_state(first, rank=0, seed=0) is None  # older checkpoints: rank 0's state as a dict


def test_changed_params_are_classified(tmp_path: Path) -> None:
    saved = tiny_params().to_dict()
    path = tmp_path / LAST
    with pytest.raises(
        ResumeError, match=r"last.pt: cannot resume: model.arch 'maskrcnn_resnet18_fpn_lite' -> "
    ):
        resume_changes(saved, tiny_params(model__arch="maskrcnn_resnet50_fpn"), path)
    with pytest.raises(ResumeError, match=r"aux.enabled True -> False.*train.resume=false"):
        resume_changes(saved, tiny_params(aux__enabled=False), path)
    schedule, other = resume_changes(
        saved, tiny_params(train__lr=5e-4, train__epochs=4, train__batch_size=1, train__resume=True), path
    )
    assert schedule == {"train.lr": (1e-3, 5e-4), "train.epochs": (1, 4)}
    assert other == {"train.batch_size": (2, 1)}  # train.resume itself is no change to report


def test_a_changed_schedule_continues_on_the_new_cosine() -> None:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = cosine_from(optimizer, epochs=10, lr=4e-3, weight_decay=0.5, epoch=3)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(4e-3 * (1 + math.cos(math.pi * 3 / 10)) / 2)
    assert optimizer.param_groups[0]["weight_decay"] == 0.5
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(4e-3 * (1 + math.cos(math.pi * 4 / 10)) / 2)


@pytest.mark.slow
def test_resume_with_more_epochs_and_a_new_lr(tiny_project: dict, tmp_path: Path, capsys) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny_project["models"], models)
    paths = TrainPaths(tiny_project["prepared"], tiny_project["maps"], models, tmp_path / "live")
    train(tiny_params(train__epochs=2, train__lr=5e-4, train__resume=True, train__eval_every=5), paths)
    out = capsys.readouterr().out
    assert "resume: train.epochs 1 -> 2" in out and "resume: train.lr 0.001 -> 0.0005" in out
    state = load_checkpoint(models / LAST)
    assert [h["epoch"] for h in state["history"]] == [1, 2]
    assert state["history"][1]["lr"] == pytest.approx(5e-4 * (1 + math.cos(math.pi * 1 / 2)) / 2)
