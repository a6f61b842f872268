"""Atomic writes: a failed stage must leave no partial or corrupt output.

Everything is written to a hidden temporary sibling first and renamed into place only when complete.
A rename within one directory is atomic on POSIX, so readers see either the old or the new content.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``final`` when the block succeeds.

    On any exception the temporary directory is removed and ``final`` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; outputs get the usual permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, old / final.name)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


@contextmanager
def atomic_file(final: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in ``final``'s directory; it is renamed to ``final`` when the block succeeds.

    ``suffix`` keeps a file extension on the temporary name for writers that insist on one (``np.savez``).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", suffix=suffix, dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.chmod(0o666 & ~_umask())  # mkstemp makes it private; outputs get the usual permissions
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """Write arrays to an uncompressed ``.npz``, atomically.

    Uncompressed because the training loop reads every sample every epoch: zlib made loading a prepared sample
    8× slower (6.9 ms vs 0.8 ms on the real 397×482 sample). Four int32 label rows take 16 bytes per pixel, no
    more than the real data's own uncompressed float64 class files.
    """
    with atomic_file(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
