"""Checkpoints: what a training run saves, how it resumes, and how inference gets a trained model back.

A checkpoint holds model, optimizer, scheduler and AMP-scaler states, the epoch, the params it was trained with,
the best score so far, the per-epoch history and every random generator's state, so a resumed run continues
exactly where the interrupted one stopped (a test checks bit-identical weights on CPU).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from cellseg import CellsegError
from cellseg.fsutil import atomic_file
from cellseg.model import CellMaskRCNN, build_model
from cellseg.params import AuxParams, ModelParams, Params
from cellseg.predict import for_inference


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
) -> None:
    """Everything needed to resume or to rebuild the model, written atomically."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "params": params.to_dict(),
        "best_score": best_score,
        "history": history,
        "rng": rng_state(),
    }
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def rng_state() -> dict:
    """Every random generator the loop draws from (RPN/RoI sampling use torch's), for an exact resume."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


class CheckpointError(CellsegError, ValueError):
    """A file that is not a cellseg checkpoint this version can rebuild a model from."""


def load_trained_model(checkpoint: str | Path, device: torch.device) -> tuple[CellMaskRCNN, dict]:
    """The model a checkpoint was trained with (its own model/aux params, not params.yaml's), ready for inference.

    Returns ``(model, checkpoint dict)``; the model is in eval mode on ``device`` (see ``predict.for_inference``).
    A foreign file (a plain state dict, weights of another model, a checkpoint of an older cellseg whose params
    differ) is a :class:`CheckpointError` that says what is missing.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: no checkpoint (run the train stage first)")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    except Exception as err:  # pickle, zip and torch errors of many types
        raise CheckpointError(
            f"{checkpoint}: cannot read as a torch file ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(state, dict) or not {"model", "params"} <= state.keys():
        found = f"keys {sorted(state)[:5]}" if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{checkpoint}: not a cellseg checkpoint (found {found}, expected 'model' and 'params'); "
            "a plain state dict goes in model.pretrained for training, not here"
        )
    try:
        trained = state["params"]
        model_params = ModelParams(**{**trained["model"], "pretrained": "none"})  # weights come from the file
        model = build_model(model_params, AuxParams(**trained["aux"]))
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
