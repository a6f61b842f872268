"""Model files are data: every checkpoint and weights file is read with torch's weights-only unpickler.

``torch.load(..., weights_only=False)`` unpickles arbitrary objects, and unpickling can call any function the
file names (a ``__reduce__`` that runs ``os.system``), so a model file received by e-mail or from a download link
could run code on the machine that opens it. :func:`load_weights_only` accepts tensors and plain data alone
(dicts, lists, tuples, strings, numbers, ``None``): a file that names any other class or function is refused with
an :class:`UnsafeModelFileError` before that name is looked up, so nothing in it runs.

cellseg's checkpoints hold nothing else (:func:`cellseg.model.checkpoint.save_checkpoint` checks it). A file
written by other code with numpy arrays or numbers in it is refused too; ``python -m cellseg.model.safe_load OLD
NEW`` rewrites such a file with those values as tensors and plain numbers, reading numpy's types alone (still
without running any code from the file).
"""

from __future__ import annotations

import argparse
import pickle
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cellseg import CellsegError
from cellseg.fsutil import atomic_file

CONVERT_COMMAND = "python -m cellseg.model.safe_load"


class ModelFileError(CellsegError, ValueError):
    """A model file that cannot be read or converted; the message names it."""


class UnsafeModelFileError(ModelFileError):
    """A model file holding objects other than tensors and plain data: refused, and nothing in it was run."""


class NotWeightsOnlyError(ValueError):
    """Data that :func:`load_weights_only` would refuse, found before it is saved (a bug, not a user error)."""


def load_weights_only(path: str | Path, advice: bool = True) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a refused file is an :class:`UnsafeModelFileError`
    (with what to do about it, unless ``advice`` is false).

    Other failures (not a torch file, a truncated archive) propagate as torch raises them: callers name the file
    and say what they expected; :func:`read_failure` gives them a one-line reason.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():  # a plain pickle's protocol: it fails below, the warning adds nothing
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if _refused(err):
            raise UnsafeModelFileError(_refusal(path, err, advice)) from None
        raise


def read_failure(err: BaseException) -> str:
    """A one-line reason for a failed :func:`load_weights_only`, without torch's advice to unpickle anyway."""
    return f"{type(err).__name__}: {_detail(str(err))[:200]}".rstrip(": ")


def _detail(text: str) -> str:
    """What the weights-only unpickler met, from torch's message (which wraps it in paragraphs of advice)."""
    if "Weights only load failed" not in text:
        return " ".join(text.strip().splitlines()[:1])
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
    if found:
        return " ".join(found.group(1).split())
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)[1:]]
    return next((p for p in paragraphs if p and not p.startswith("Check the documentation")), "")


REFUSALS = re.compile(r"GLOBAL \S+|Can only (create|build|append|setitems|update)|reduce for unrecognized")
"""What torch's weights-only unpickler says when a file names a class or function it does not build (not an
opcode it does not know, which is what a file not written by ``torch.save`` gives: text, a plain pickle)."""


def _refused(err: pickle.UnpicklingError) -> bool:
    text = str(err)
    return "Weights only load failed" in text and REFUSALS.search(_detail(text)) is not None


def _unsafe_globals(path: Path, err: BaseException) -> list[str]:
    """The classes and functions the file names beyond torch's allowlist, read from its pickle opcodes alone."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # a file in torch's legacy format: the first one the unpickler met
        return re.findall(r"GLOBAL (\S+)", _detail(str(err)))[:1]


def _refusal(path: Path, err: BaseException, advice: bool) -> str:
    names = _unsafe_globals(path, err)
    found = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    head = (
        f"{path}: refused: the file holds objects other than tensors and plain data "
        f"({found or read_failure(err)}), and cellseg never runs code from a model file (nothing in it was run)."
    )
    if not advice:
        return head
    if names and all(name.split(".")[0] == "numpy" for name in names):
        return (
            f"{head} These are numpy arrays or numbers, as files written by other code (or an older cellseg) "
            f"may hold: `{CONVERT_COMMAND} {path} NEW.pt` rewrites them as tensors and plain numbers, reading "
            "numpy's types alone, and NEW.pt then loads."
        )
    return f"{head} Use a checkpoint written by cellseg's train stage (or a plain state dict of tensors)."


# ----------------------------------------------------------------------------------------- what may be saved
def check_weights_only(obj: Any, where: str = "checkpoint") -> None:
    """Raise :class:`NotWeightsOnlyError` naming the first value ``torch.load(weights_only=True)`` would refuse.

    Checks the values cellseg saves beyond tensors: dicts (string or int keys), lists, tuples, strings,
    numbers, booleans and ``None``; ``torch.Size`` and ``torch.dtype`` are allowed as torch allows them.
    """
    if isinstance(obj, np.generic):  # np.float64 is a float, but pickles as a numpy scalar
        raise NotWeightsOnlyError(f"{where}: a numpy {type(obj).__name__}; save {obj.item()!r} instead")
    if obj is None or type(obj) in (bool, int, float, str, bytes):  # subclasses (enums) pickle by class name
        return
    if isinstance(obj, (torch.Tensor, torch.Size, torch.dtype)):
        return
    if type(obj) in (dict, OrderedDict, list, tuple):
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for key, value in items:
            if isinstance(obj, dict):
                check_weights_only(key, f"{where} key")
            check_weights_only(value, f"{where}[{key!r}]")
        return
    raise NotWeightsOnlyError(f"{where}: a {type(obj).__module__}.{type(obj).__qualname__}, not plain data")


# ------------------------------------------------------------------------------ converting numpy-holding files
def _numpy_globals() -> list:
    """numpy's pickling names, also under numpy 1's module paths (``numpy.core``) for files it wrote."""
    core = (np._core if hasattr(np, "_core") else np.core).multiarray  # numpy 2, numpy 1
    named = [core._reconstruct, core.scalar, np.ndarray, np.dtype]
    named += [cls for cls in vars(np.dtypes).values() if isinstance(cls, type) and issubclass(cls, np.dtype)]
    aliases = [
        (core._reconstruct, "numpy.core.multiarray._reconstruct"),
        (core.scalar, "numpy.core.multiarray.scalar"),
    ]
    return named + aliases


def plain(obj: Any) -> Any:
    """``obj`` with numpy arrays as tensors (lists when torch has no such dtype) and numpy numbers as Python's."""
    if isinstance(obj, np.ndarray):
        try:
            return torch.from_numpy(np.ascontiguousarray(obj).copy())
        except TypeError:  # object, string or other dtypes torch does not hold
            return plain(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        converted = type(obj)((plain(k), plain(v)) for k, v in obj.items())
        if getattr(obj, "__dict__", None):  # a state dict's _metadata
            converted.__dict__.update(obj.__dict__)
        return converted
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    return obj


def convert_numpy_file(old: str | Path, new: str | Path) -> None:
    """Rewrite ``old`` with its numpy values as tensors and plain numbers (:func:`plain`) to ``new``.

    ``old`` is read with the weights-only unpickler extended by numpy's array, number and dtype types alone, so a
    file naming any other class or function is still refused and nothing in it runs.
    """
    old, new = Path(old), Path(new)
    if not old.is_file():
        raise FileNotFoundError(f"{old}: no such file")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            state = load_weights_only(old, advice=False)
    except UnsafeModelFileError as err:
        raise UnsafeModelFileError(
            f"{err} It holds more than numpy values: it cannot be converted."
        ) from None
    except Exception as err:  # not a torch file, a truncated one
        raise ModelFileError(f"{old}: cannot read as a torch file ({read_failure(err)})") from err
    converted = plain(state)
    try:
        check_weights_only(converted, str(old))
    except NotWeightsOnlyError as err:  # a numpy array of objects torch does not hold (dates, say)
        raise ModelFileError(f"cannot convert: {err}") from None
    with atomic_file(new) as tmp:
        torch.save(converted, tmp)
    load_weights_only(new)  # what was written loads as it must


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=CONVERT_COMMAND,
        description="Rewrite a model file's numpy arrays and numbers as tensors and plain numbers, so that "
        "cellseg loads it (the file is read without running code from it).",
    )
    parser.add_argument("old", type=Path, help="the refused file")
    parser.add_argument("new", type=Path, help="written: the converted file")
    args = parser.parse_args(argv)
    convert_numpy_file(args.old, args.new)
    print(f"wrote {args.new}")


if __name__ == "__main__":
    from cellseg.entry import run

    run(main)
