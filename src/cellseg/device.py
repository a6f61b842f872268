"""Which device runs the work: one rule for training and for every inference entry point."""

from __future__ import annotations

import torch

from cellseg.params import ParamsError


def select_device(name: str, key: str = "device") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an explicit device that is not available is an error."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        name = next(d for d in ("cuda", "mps", "cpu") if available[d])
    if not available[name]:
        raise ParamsError(f"{key}={name} is not available on this machine (use auto or cpu)")
    return torch.device(name)
