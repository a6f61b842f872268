"""Training for a time budget (``train.time_budget_min``) instead of an epoch count.

An epoch count is the wrong unit for "30 minutes": the same recipe takes 28 s an epoch on a CPU with native
bf16 and 107 s on one with AVX2 only. With a budget, the run trains a short warm-up, measures what a step and a
validation pass cost on this machine, and fixes the number of steps (the *plan*) so that the whole stage ends
within the budget; the learning rate then follows a cosine from ``train.lr`` to zero over exactly those steps
(budgeted-training work favours a schedule that reaches zero at the deadline). The plan is saved in every
checkpoint, so a resumed run keeps it (and stays bit-identical to an uninterrupted one).

- **What the budget covers** (``train.budget_scope``): ``train``, the train stage alone (from building the
  model to ``summary.json``, its validation passes and checkpoints included); ``pipeline``, the whole
  ``dvc exp run`` of the recipe: the stage also leaves room for prepare and maps before it (estimated:
  :data:`PRE_TRAIN_SECONDS` plus :data:`PRE_TRAIN_PER_IMAGE` per training, validation and test image) and for
  tune, evaluate and submit after it (estimated from the inference time per image measured at planning, times
  the images each predicts, plus :data:`STAGE_START_SECONDS` each).
- **A machine that slows down**: the plan is fixed, but before each step the run checks that the step and the
  validation passes still planned fit in what is left; when they do not, it stops there (the schedule then ends
  above zero) and validates. So the stage ends late by at most one step plus the error of the validation
  estimate, however slow the machine becomes.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

WARMUP_STEPS = 12
"""Steps trained before the plan: the first two (allocations, oneDNN's kernel choice) are not timed."""
UNTIMED_STEPS = 2
SAFETY = 0.02
"""Share of the budget kept free for what the measurements miss (the DVC bookkeeping between stages)."""
PRE_TRAIN_SECONDS = 60.0
PRE_TRAIN_PER_IMAGE = 0.05
"""prepare + maps (``pipeline`` scope): measured 3.7 s + 5.5 s on consep-dev's 432 images on a 2-core CPU; the
constant also covers DVC's own work before training (hashing, checkout)."""
STAGE_START_SECONDS = 10.0
"""Each stage after training starts a Python process and loads the model (``pipeline`` scope)."""
TIMED_VAL_IMAGES = 3


def cpu_isa() -> str:
    """The CPU's widest instruction set that matters to PyTorch here: ``avx512_bf16``, ``avx512``, ``avx2`` or
    ``other`` (``/proc/cpuinfo``; ``ATEN_CPU_CAPABILITY`` narrows what PyTorch uses and is named when set)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    isa = next(
        (name for name, flag in (("avx512_bf16", "avx512_bf16"), ("avx512", "avx512f"), ("avx2", "avx2"))
         if flag in flags),
        "other",
    )  # fmt: skip
    import os

    forced = os.environ.get("ATEN_CPU_CAPABILITY")
    return f"{isa} (ATEN_CPU_CAPABILITY={forced})" if forced else isa


@dataclass
class BudgetPlan:
    """What the warm-up measured and the steps it leaves room for. Saved in every checkpoint."""

    budget_seconds: float
    scope: str
    steps_per_epoch: int
    warmup_steps: int
    step_seconds: float
    val_seconds: float  # one validation pass
    epoch_overhead_seconds: float  # checkpoints written after each epoch
    reserved_seconds: float  # stages before and after training (scope "pipeline")
    elapsed_at_plan: float
    planned_steps: int
    planned_epochs: int
    evaluations: int
    isa: str
    device: str

    def lr_factor(self, step: int) -> float:
        """The learning rate's share of ``train.lr`` after ``step`` steps: cosine to zero at the plan's end."""
        if step >= self.planned_steps:
            return 0.0
        return (1 + math.cos(math.pi * step / self.planned_steps)) / 2


def evaluation_count(epochs: int, eval_every: int) -> int:
    """Validation passes of a run of ``epochs``: every ``eval_every`` epochs and the last."""
    return epochs // eval_every + (1 if epochs % eval_every else 0)


def make_plan(
    budget_seconds: float,
    scope: str,
    elapsed: float,
    steps_done: int,
    steps_per_epoch: int,
    step_seconds: float,
    val_seconds: float,
    epoch_overhead: float,
    reserved: float,
    eval_every: int,
    isa: str,
    device: str,
) -> BudgetPlan:
    """The most steps that fit: what is left of the budget (less :data:`SAFETY` and ``reserved``) pays for
    the steps after the warm-up and for the validation passes and checkpoints of the epochs they make (a cost
    that only grows with the steps: a binary search finds the largest)."""
    left = budget_seconds * (1 - SAFETY) - elapsed - reserved

    def cost(steps: int) -> float:
        epochs = max(1, math.ceil(steps / steps_per_epoch))
        fixed = evaluation_count(epochs, eval_every) * val_seconds + epochs * epoch_overhead
        return (steps - steps_done) * step_seconds + fixed

    steps, high = steps_done, steps_done + max(0, int(left / step_seconds)) + 1
    while steps < high:  # invariant: `steps` fits (or is the warm-up's), `high` does not
        middle = (steps + high + 1) // 2
        if cost(middle) <= left:
            steps = middle
        else:
            high = middle - 1
    epochs = max(1, math.ceil(steps / steps_per_epoch))
    return BudgetPlan(
        budget_seconds, scope, steps_per_epoch, steps_done, step_seconds, val_seconds, epoch_overhead,
        reserved, elapsed, steps, epochs, evaluation_count(epochs, eval_every), isa, device,
    )  # fmt: skip


@dataclass
class BudgetClock:
    """Runs the budget during training: times the warm-up, makes the plan (``plan_now``), steps the learning
    rate's schedule, and says when to stop. ``start`` is the stage's start (``time.perf_counter()``)."""

    budget_seconds: float
    start: float
    eval_every: int
    plan: BudgetPlan | None = None
    steps_done: int = 0
    epoch: int = 0
    stopped_at_deadline: bool = False
    _timed: list[float] = field(default_factory=list)
    _last: float | None = None

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def runs_epoch(self, epoch: int) -> bool:
        """Whether another epoch is trained: until the plan exists, yes; then while it has steps left (an epoch's
        length may vary with repeat-factor sampling: the steps, not the epochs, end the run)."""
        if self.stopped_at_deadline:
            return False
        return self.plan is None or self.steps_done < self.plan.planned_steps

    def is_eval_epoch(self, epoch: int) -> bool:
        """Validation after every ``eval_every`` epochs and after the last one (also when stopped early)."""
        last = self.plan is not None and self.steps_done >= self.plan.planned_steps
        return (epoch + 1) % self.eval_every == 0 or last or self.stopped_at_deadline

    def begin_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._last = time.perf_counter()

    def after_step(self, plan_now: Callable[[list[float]], BudgetPlan]) -> bool:
        """Record a finished step; make the plan after the warm-up; ``True`` when training must stop now."""
        now = time.perf_counter()
        if self._last is not None and self.steps_done >= UNTIMED_STEPS:
            self._timed.append(now - self._last)
        self.steps_done += 1
        if self.plan is None and self.steps_done >= WARMUP_STEPS and len(self._timed) >= 3:
            self.plan = plan_now(self._timed)
        self._last = time.perf_counter()  # planning's own inference is not a step
        if self.plan is None:
            return False
        if self.steps_done >= self.plan.planned_steps:
            return True
        return self._past_deadline()

    def _evaluations_due(self) -> int:
        """Validation passes still to come from the current epoch on (at least the final one)."""
        due = sum(
            1 for e in range(self.epoch, self.plan.planned_epochs)
            if (e + 1) % self.eval_every == 0 or e + 1 == self.plan.planned_epochs
        )  # fmt: skip
        return max(1, due)

    def _past_deadline(self) -> bool:
        """Whether one more step and the validation passes still due would end past the budget."""
        plan = self.plan
        needed = plan.step_seconds + self._evaluations_due() * plan.val_seconds + plan.reserved_seconds
        if self.elapsed + needed > self.budget_seconds:
            self.stopped_at_deadline = True
            return True
        return False

    def state(self) -> dict:
        """What a checkpoint keeps: the plan (none yet during a warm-up longer than an epoch), the steps done."""
        return {"plan": asdict(self.plan) if self.plan else None, "steps_done": self.steps_done}

    def restore(self, saved: dict) -> None:
        self.plan = BudgetPlan(**saved["plan"]) if saved["plan"] else None
        self.steps_done = int(saved["steps_done"])

    def summary(self, batch_size: int) -> dict:
        """``summary.json``'s ``budget`` entry: the plan and what was achieved."""
        plan = self.plan
        return {
            "plan": asdict(plan) if plan else None,
            "achieved_steps": self.steps_done,
            "achieved_epochs": round(self.steps_done / plan.steps_per_epoch, 3) if plan else None,
            "stage_seconds": round(self.elapsed, 1),
            "stopped_at_deadline": self.stopped_at_deadline,
            "images_per_second": round(batch_size / plan.step_seconds, 3) if plan else None,
        }


def checkpoint_seconds(state_dicts: list[dict]) -> float:
    """How long writing these state dicts takes (in memory: the file system adds little on a local disk)."""
    start = time.perf_counter()
    for state in state_dicts:
        torch.save(state, io.BytesIO())
    return time.perf_counter() - start
