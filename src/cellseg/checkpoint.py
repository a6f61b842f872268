"""Checkpoints: what a training run saves, how it resumes, and how inference gets a trained model back.

A checkpoint holds model, optimizer, scheduler and AMP-scaler states, the epoch, the params it was trained with,
the best score so far, the per-epoch history and every random generator's state, so a resumed run continues
exactly where the interrupted one stopped (a test checks bit-identical weights on CPU).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

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


def load_trained_model(checkpoint: str | Path, device: torch.device) -> tuple[CellMaskRCNN, dict]:
    """The model a checkpoint was trained with (its own model/aux params, not params.yaml's), ready for inference.

    Returns ``(model, checkpoint dict)``; the model is in eval mode on ``device`` (see ``predict.for_inference``).
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: no checkpoint (run the train stage first)")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    trained = state["params"]
    model_params = ModelParams(**{**trained["model"], "pretrained": "none"})  # weights come from the file
    # Checkpoints from before aux.boundary_downsample were trained with the nearest-neighbour target.
    aux_params = AuxParams(**{"boundary_downsample": "nearest", **trained["aux"]})
    model = build_model(model_params, aux_params)
    model.load_state_dict(state["model"])
    return for_inference(model, device), state
