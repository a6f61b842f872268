"""Checkpoints: what a training run saves, how it resumes, and how inference gets a trained model back.

A checkpoint holds model, optimizer, scheduler and AMP-scaler states, the epoch, the params it was trained with,
the best score so far, the per-epoch history and every rank's random generator state, so a resumed run continues
exactly where the interrupted one stopped (a test checks bit-identical weights on CPU). Everything beyond the
tensors is plain data (numbers, strings, lists, dicts): every checkpoint is read with torch's weights-only
unpickler (:mod:`cellseg.model.safe_load`), so opening a model file never runs code from it.

The params saved hold ``classes``, the class names in order: inference rebuilds the model for that many
classes and shows those names (:func:`checkpoint_classes`; a checkpoint saved before the setting existed has the
four ``class1..class4``).

Resuming with changed params (:func:`resume_changes`): a change to what the weights *are* (architecture,
trainable stages, anchors, aux heads, the classes) is an error that says so; ``train.lr``, ``train.weight_decay`` and
``train.epochs`` apply from the resumed epoch on, the cosine schedule following the new values; every other
change applies as it is, and each one is printed.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from cellseg import DEFAULT_CLASSES, CellsegError
from cellseg.fsutil import atomic_file
from cellseg.model.maskrcnn import CellMaskRCNN, build_model, for_inference
from cellseg.model.safe_load import check_weights_only, load_weights_only, plain, read_failure
from cellseg.params import AuxParams, ModelParams, Params, ParamsError, check_classes


def save_checkpoint(
    path: Path,
    model: CellMaskRCNN,
    optimizer,
    scheduler,
    scaler,
    epoch: int,
    params: Params,
    best_score: float,
    history: list[dict],
    rng: list[dict] | None = None,
    budget: dict | None = None,
) -> None:
    """Everything needed to resume or to rebuild the model, written atomically.

    ``budget``: a time budget's plan and steps done (:mod:`cellseg.train.budget`), ``None`` for an epoch count.
    ``rng``: every rank's :func:`rng_state`, in rank order (this process's alone when not given). Everything but
    the tensors is saved as plain data (a numpy number in the history becomes a Python one), so the file loads
    with ``weights_only=True``; anything else is a :class:`~cellseg.model.safe_load.NotWeightsOnlyError` here,
    not a checkpoint that no one can open.
    """
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": plain(scheduler.state_dict()),
        "scaler": plain(scaler.state_dict()),
        "epoch": int(epoch),
        "params": plain(params.to_dict()),
        "best_score": float(best_score),
        "history": plain(history),
        "rng": plain(rng if rng is not None else [rng_state()]),
        "budget": plain(budget),
    }
    check_weights_only(state, str(path))
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def rng_state() -> dict:
    """This process's random generators (RPN/RoI sampling use torch's), its own GPU's only, for an exact resume."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_device"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(saved: list[dict] | dict, rank: int, seed: int) -> str | None:
    """Give this rank its own saved generators; returns a note when they cannot be restored exactly.

    A checkpoint from a run with fewer ranks has no state for the extra ones: they start a fresh stream seeded
    by ``(seed, rank)``. Checkpoints from before per-rank states held rank 0's alone, as a dict.
    """
    states = [saved] if isinstance(saved, dict) else list(saved)
    if rank >= len(states):
        random.seed(seed + rank)
        torch.manual_seed(seed + rank)
        return (
            f"the checkpoint has random states for {len(states)} rank(s); rank {rank} starts a fresh stream"
        )
    state = states[rank]
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda_device" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_device"])
    return None


def restore_scaler(scaler, saved: dict) -> str | None:
    """Load a GradScaler's state; a run saved without fp16 scaling (empty state) resumes with a fresh scaler."""
    if not scaler.is_enabled():
        return None if not saved else "the checkpoint's fp16 loss scale is not needed at this precision"
    if not saved:
        return "the checkpoint was trained without fp16 loss scaling: starting with a fresh scale"
    scaler.load_state_dict(saved)
    return None


class ResumeError(CellsegError, ValueError):
    """The checkpoint cannot be resumed with today's params."""


WEIGHT_DEFINING = {
    "model": ("arch", "trainable_layers", "anchor_sizes"),
    "aux": ("enabled", "hidden_channels"),
}
"""Params that change what the weights or the optimised parameters are: resuming across them is an error."""
WEIGHT_DEFINING_TOP_LEVEL = ("classes",)
"""Top-level params (values, not sections) of that kind: the classes size and name the predictors' outputs."""
SAVED_BEFORE = {"classes": list(DEFAULT_CLASSES)}
"""The value of a top-level key in a checkpoint saved before the key existed."""

SCHEDULE = ("lr", "weight_decay", "epochs")
"""``train`` params that re-shape the optimisation from the resumed epoch on."""


def resume_changes(saved: dict, params: Params, path: Path) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """Compare a checkpoint's params with today's: ``(schedule changes, other changes)``, each
    ``{"section.key": (old, new)}``. Raises :class:`ResumeError` for a weight-defining change."""
    today = params.to_dict()
    changed = {
        f"{section}.{key}": (saved[section][key], value)
        for section, values in today.items()
        if isinstance(values, dict) and isinstance(saved.get(section), dict)
        for key, value in values.items()
        if key in saved[section] and saved[section][key] != value
    }
    for key, value in today.items():  # top-level values (classes): compared whole
        if not isinstance(value, dict) and (key in saved or key in SAVED_BEFORE):
            old = saved.get(key, SAVED_BEFORE.get(key))
            if old != value:
                changed[key] = (old, value)
    fatal = [
        k
        for k in changed
        if k in WEIGHT_DEFINING_TOP_LEVEL
        or k.partition(".")[2] in WEIGHT_DEFINING.get(k.partition(".")[0], ())
    ]
    if fatal:
        parts = ", ".join(f"{k} {changed[k][0]!r} -> {changed[k][1]!r}" for k in fatal)
        raise ResumeError(
            f"{path}: cannot resume: {parts} since the checkpoint was saved. Restore the old value(s), or "
            "set train.resume=false to start a new run."
        )
    schedule = {k: v for k, v in changed.items() if k in {f"train.{s}" for s in SCHEDULE}}
    other = {k: v for k, v in changed.items() if k not in schedule and k != "train.resume"}
    other.pop("model.pretrained", None)  # resumed weights come from the checkpoint
    return schedule, other


class CheckpointError(CellsegError, ValueError):
    """A file that is not a cellseg checkpoint this version can rebuild a model from."""


def read_checkpoint(path: str | Path) -> object:
    """The contents of a model file, read without running code from it (:mod:`cellseg.model.safe_load`).

    A file holding anything but tensors and plain data is an
    :class:`~cellseg.model.safe_load.UnsafeModelFileError`; one torch cannot read, a :class:`CheckpointError`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint (run the train stage first)")
    try:
        return load_weights_only(path)
    except CellsegError:
        raise
    except Exception as err:  # zip, pickle and torch errors of many types
        raise CheckpointError(f"{path}: cannot read as a torch file ({read_failure(err)})") from err


def load_checkpoint(path: str | Path) -> dict:
    """A training checkpoint, to resume from (:func:`read_checkpoint`, checked to be one)."""
    state = read_checkpoint(path)
    needed = {"model", "optimizer", "scheduler", "scaler", "epoch", "params", "best_score", "history", "rng"}
    missing = needed - set(state if isinstance(state, dict) else ())
    if missing:
        raise CheckpointError(
            f"{path}: not a cellseg training checkpoint (no {', '.join(sorted(missing))}); set "
            "train.resume=false to start a new run"
        )
    return state


def checkpoint_classes(state: dict, path: str | Path = "checkpoint") -> tuple[str, ...]:
    """The class names a checkpoint was trained with (its params' ``classes``, class 1 first); a checkpoint
    saved before ``classes`` existed was trained on the four :data:`cellseg.DEFAULT_CLASSES`."""
    trained = state.get("params") if isinstance(state, dict) else None
    if not isinstance(trained, dict) or "classes" not in trained:
        return DEFAULT_CLASSES
    try:
        return check_classes(trained["classes"], f"{path}: classes")
    except ParamsError as err:
        raise CheckpointError(str(err)) from None


def load_trained_model(checkpoint: str | Path, device: torch.device) -> tuple[CellMaskRCNN, dict]:
    """The model a checkpoint was trained with (its own model/aux params and classes, not params.yaml's), ready
    for inference.

    Returns ``(model, checkpoint dict)``; the model is in eval mode on ``device`` (see ``maskrcnn.for_inference``).
    A foreign file (a plain state dict, weights of another model, a checkpoint of an older cellseg whose params
    differ) is a :class:`CheckpointError` that says what is missing.
    """
    checkpoint = Path(checkpoint)
    state = read_checkpoint(checkpoint)
    if not isinstance(state, dict) or not {"model", "params"} <= state.keys():
        found = f"keys {sorted(state)[:5]}" if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{checkpoint}: not a cellseg checkpoint (found {found}, expected 'model' and 'params'); "
            "a plain state dict goes in model.pretrained for training, not here"
        )
    try:
        trained = state["params"]
        model_params = ModelParams(**{**trained["model"], "pretrained": "none"})  # weights come from the file
        # Checkpoints from before aux.boundary_downsample were trained with the nearest-neighbour target.
        aux_params = AuxParams(**{"boundary_downsample": "nearest", **trained["aux"]})
        model = build_model(model_params, aux_params, len(checkpoint_classes(state, checkpoint)))
        _freeze_batch_norms_like(model, state["model"])
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"{checkpoint}: written by another cellseg version or for another model, cannot rebuild it "
            f"({type(err).__name__}: {str(err).splitlines()[0][:300]})"
        ) from err
    return for_inference(model, device), state


def _freeze_batch_norms_like(model: nn.Module, weights: dict) -> None:
    """Use ``FrozenBatchNorm2d`` wherever the trained model did (pretrained backbones), as its weights show.

    Rebuilt without pretrained weights, the backbone has ``BatchNorm2d`` layers, whose state holds a
    ``num_batches_tracked`` counter that a frozen layer's lacks, so the checkpoint would not load.
    """
    for name, module in list(model.named_modules()):
        if (
            isinstance(module, nn.BatchNorm2d)
            and f"{name}.running_mean" in weights
            and f"{name}.num_batches_tracked" not in weights
        ):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, FrozenBatchNorm2d(module.num_features, module.eps))
