"""Provenance: which model made a result, so that a submission or a folder of label maps can be traced to it.

:func:`provenance` gives the checkpoint's path, size and sha256, the epochs it was trained for, the params it was
trained with (as the checkpoint records them) and the cellseg version that predicted. The commands that predict
write it, with the inference settings they used, as ``provenance.json`` beside their outputs (never inside a
file whose format is fixed, such as the COCO results list).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cellseg import __version__

PROVENANCE_FILE = "provenance.json"
_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks (a checkpoint can be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def provenance(checkpoint_path: str | Path, state: dict) -> dict:
    """What identifies the model behind a result: ``checkpoint_path`` as given (a relative path stays relative,
    so the record does not change between machines), its size and sha256, and from ``state`` (the checkpoint's
    contents, as :func:`cellseg.model.checkpoint.load_trained_model` returns them) the epochs trained and the
    training params; and this cellseg's version."""
    path = Path(checkpoint_path)
    epoch = state.get("epoch")
    return {
        "checkpoint": str(checkpoint_path),
        "checkpoint_sha256": sha256_file(path),
        "checkpoint_bytes": path.stat().st_size,
        "cellseg_version": __version__,
        "trained_epochs": int(epoch) + 1 if isinstance(epoch, int) else None,
        "trained_params": state.get("params"),
    }
