"""Training for a time budget (``train.time_budget_min``): the plan's arithmetic, the schedule, a run whose
step is artificially slowed (the budget holds, also when the machine slows down mid-run) and a resume that keeps
the plan and stays bit-identical."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

import cellseg.train.loop as train_module
from cellseg.model.checkpoint import load_checkpoint
from cellseg.train.budget import SAFETY, BudgetPlan, evaluation_count, make_plan
from cellseg.train.loop import LAST, TrainPaths, train
from conftest import tiny_params


def _paths(tiny_project: dict, root: Path) -> TrainPaths:
    return TrainPaths(tiny_project["prepared"], tiny_project["maps"], root / "models", root / "live")


def _plan(**changes) -> BudgetPlan:
    args = dict(budget_seconds=600.0, scope="train", elapsed=30.0, steps_done=12, steps_per_epoch=50,
                step_seconds=0.5, val_seconds=20.0, epoch_overhead=0.4, reserved=0.0, eval_every=5,
                isa="avx2", device="cpu")  # fmt: skip
    args.update(changes)
    return make_plan(**args)


def _cost(plan: BudgetPlan, steps: int) -> float:
    """What ``steps`` steps cost from the start of the stage: the spent time, the steps after the warm-up, the
    validation passes and checkpoints of the epochs they make."""
    epochs = -(-steps // plan.steps_per_epoch)
    return (
        plan.elapsed_at_plan + (steps - plan.warmup_steps) * plan.step_seconds
        + evaluation_count(epochs, 5) * plan.val_seconds + epochs * plan.epoch_overhead_seconds
        + plan.reserved_seconds
    )  # fmt: skip


def test_the_plan_buys_the_steps_that_fit_and_no_more() -> None:
    for changes in ({}, {"reserved": 120.0}, {"step_seconds": 1.7}, {"val_seconds": 90.0}):
        plan = _plan(**changes)
        usable = plan.budget_seconds * (1 - SAFETY)
        assert _cost(plan, plan.planned_steps) <= usable, changes
        assert _cost(plan, plan.planned_steps + plan.steps_per_epoch // 2) > usable, changes  # close to full
        assert plan.planned_epochs == -(-plan.planned_steps // 50)
    assert _plan(elapsed=700.0).planned_steps == 12  # over budget already: no more steps


def test_the_schedule_is_a_cosine_to_zero_at_the_plan_end() -> None:
    plan = _plan()
    factors = [plan.lr_factor(s) for s in range(plan.planned_steps + 2)]
    assert factors[0] == 1.0 and factors[-1] == 0.0 and factors[plan.planned_steps] == 0.0
    assert all(a >= b for a, b in zip(factors, factors[1:], strict=False))
    assert plan.lr_factor(plan.planned_steps // 2) == pytest.approx(0.5, abs=0.01)


def _slow_steps(monkeypatch, seconds: list[float]) -> None:
    """Every training step sleeps ``seconds[0]`` more (a slower CPU); change it mid-run to slow the machine."""
    real = train_module.sum_across_ranks

    def slowed(values, info):
        time.sleep(seconds[0])
        return real(values, info)

    monkeypatch.setattr(train_module, "sum_across_ranks", slowed)


@pytest.mark.slow
def test_a_slowed_step_gets_fewer_steps_and_the_budget_holds(tiny_project, tmp_path, monkeypatch) -> None:
    budget_min = 1.0  # room after the warm-up on a slower CPU too (the warm-up is about 12 s here)
    params = tiny_params(train__time_budget_min=budget_min, train__eval_every=100)
    _slow_steps(monkeypatch, [0.15])
    start = time.perf_counter()
    summary = train(params, _paths(tiny_project, tmp_path / "a"))
    wall = time.perf_counter() - start
    budget = summary["budget"]
    plan = budget["plan"]
    assert plan["step_seconds"] > 0.15 and plan["isa"] and plan["planned_steps"] > plan["warmup_steps"]
    # the warm-up's steps run a few percent faster than later ones (measured: 3-15%), and a 1-minute budget
    # keeps only 1.2 s in reserve: the deadline may take the plan's last step or two, never more
    short = plan["planned_steps"] - budget["achieved_steps"]
    assert 0 <= short <= max(2, 0.03 * plan["planned_steps"]) and budget["stopped_at_deadline"] == (short > 0)
    assert wall <= budget_min * 60 + plan["val_seconds"] + 2  # within the budget plus one evaluation
    assert wall >= 0.7 * budget_min * 60  # and it used the budget
    saved = json.loads((tmp_path / "a" / "models" / "summary.json").read_text())
    assert saved["budget"]["plan"] == plan
    # the epochs it ran: all planned ones, less those whose steps the deadline took
    assert saved["epochs"] == math.ceil(budget["achieved_steps"] / plan["steps_per_epoch"])
    assert plan["planned_epochs"] - saved["epochs"] <= math.ceil(short / plan["steps_per_epoch"])
    history = load_checkpoint(tmp_path / "a" / "models" / LAST)["history"]
    assert "val/map" in history[-1]  # the last epoch was validated
    assert history[-1]["lr"] < 0.05 * params.train.lr  # the cosine ends near zero


@pytest.mark.slow
def test_a_machine_that_slows_down_mid_run_stops_at_the_deadline(tiny_project, tmp_path, monkeypatch) -> None:
    budget_min = 1.25
    params = tiny_params(train__time_budget_min=budget_min, train__eval_every=100)
    delay = [0.05]
    _slow_steps(monkeypatch, delay)
    real_plan = train_module.make_plan

    def plan_then_slow_down(*args, **kwargs):
        plan = real_plan(*args, **kwargs)
        delay[0] = 0.6  # after the plan, every step costs several times what the warm-up measured
        return plan

    monkeypatch.setattr(train_module, "make_plan", plan_then_slow_down)
    start = time.perf_counter()
    summary = train(params, _paths(tiny_project, tmp_path / "b"))
    wall = time.perf_counter() - start
    budget = summary["budget"]
    assert budget["stopped_at_deadline"] and budget["achieved_steps"] < budget["plan"]["planned_steps"]
    assert wall <= budget_min * 60 + 0.6 + budget["plan"]["step_seconds"] + budget["plan"]["val_seconds"] + 2


@pytest.mark.slow
def test_a_resumed_budget_run_keeps_its_plan_and_is_bit_identical(
    tiny_project, tmp_path, monkeypatch
) -> None:
    """The plan comes from the checkpoint, not from a new measurement: the same steps, the same schedule."""
    fixed = []
    real_plan = train_module.make_plan

    def the_same_plan(*args, **kwargs):
        plan = real_plan(*args, **kwargs)
        plan.planned_steps, plan.planned_epochs = 16, 8  # whatever was measured: both runs plan alike
        fixed.append(plan)
        return plan

    monkeypatch.setattr(train_module, "make_plan", the_same_plan)
    params = tiny_params(train__time_budget_min=5, train__eval_every=4)
    train(params, _paths(tiny_project, tmp_path / "straight"))

    real_epoch = train_module.train_one_epoch

    def interrupted(model, loader, optimizer, scaler, device, epoch, *args):
        if epoch == 7:
            raise KeyboardInterrupt  # killed during the last epoch, after the plan
        return real_epoch(model, loader, optimizer, scaler, device, epoch, *args)

    monkeypatch.setattr(train_module, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(params, _paths(tiny_project, tmp_path / "resumed"))
    monkeypatch.setattr(train_module, "train_one_epoch", real_epoch)
    assert len(fixed) == 2
    resumed_params = tiny_params(train__time_budget_min=9, train__eval_every=4, train__resume=True)
    summary = train(resumed_params, _paths(tiny_project, tmp_path / "resumed"))
    assert len(fixed) == 2  # no new plan: the checkpoint's
    assert summary["budget"]["plan"]["budget_seconds"] == 300  # the 9 minutes asked now are ignored
    straight = load_checkpoint(tmp_path / "straight" / "models" / LAST)
    resumed = load_checkpoint(tmp_path / "resumed" / "models" / LAST)
    assert resumed["budget"]["steps_done"] == straight["budget"]["steps_done"] == 16
    assert [h["lr"] for h in resumed["history"]] == [h["lr"] for h in straight["history"]]
    for key, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=0, msg=key)


def test_a_budget_cannot_resume_an_epoch_count_run(tiny_project, tmp_path) -> None:
    from cellseg.params import ParamsError

    paths = _paths(tiny_project, tmp_path / "c")
    train(tiny_params(), paths)
    with pytest.raises(
        ParamsError, match="without a time budget; resume with the same train.time_budget_min"
    ):
        train(tiny_params(train__time_budget_min=1, train__resume=True), paths)
