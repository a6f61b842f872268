"""The tune stage's ``thresholds.json``: written by :mod:`cellseg.eval.tune`, applied to the params here.

``label_score_threshold_per_class`` (``{"1": t1, ..., "K": tK}``, K the model's classes) becomes ``predict.class_score_thresholds``,
which every label map then applies (a class the entry does not name keeps ``label_score_threshold``); a file
without the entry, written before per-class tuning, keeps the params' own ``class_score_thresholds``.

The thresholds live with the model (StarDist's way): :func:`cellseg.model.bundle.open_model` applies them when
it opens a checkpoint, for every entry point that makes hard outputs (``evaluate``, ``submit``,
``cellseg predict``, ``cellseg slide``); apart from the tuning, so that applying them does not depend on the
scoring code. ``thresholds_beside`` finds the file next to a checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from cellseg.data.io import DataFormatError
from cellseg.params import PostprocParams, PredictParams, replace

THRESHOLDS_FILE = "thresholds.json"
TUNED_KEYS = ("label_score_threshold", "mask_threshold")
PEAK_KEY = "peak_threshold"  # postproc.peak_threshold: stored always, tuned only with a step on and heads
PER_CLASS_KEY = "label_score_threshold_per_class"  # {"1": t1, ..., "K": tK}: predict.class_score_thresholds


def thresholds_beside(checkpoint: str | Path) -> Path | None:
    """``thresholds.json`` next to ``checkpoint``, or ``None`` when there is none."""
    path = Path(checkpoint).parent / THRESHOLDS_FILE
    return path if path.is_file() else None


def untuned(params: PredictParams, postproc: PostprocParams | None = None) -> dict:
    """The thresholds file of a run that does not tune: the params' own values."""
    stored = {"tuned": False, **{key: getattr(params, key) for key in TUNED_KEYS}}
    if params.class_score_thresholds:
        stored[PER_CLASS_KEY] = per_class_entry(params.class_score_thresholds)
    if postproc is not None:
        stored[PEAK_KEY] = postproc.peak_threshold
    return stored


def per_class_entry(thresholds: list[float] | tuple[float, ...]) -> dict[str, float]:
    """The file's per-class entry: class ids (as strings, JSON keys) to thresholds."""
    return {str(k): float(t) for k, t in enumerate(thresholds, start=1)}


def _per_class(stored: object, default: float, num_classes: int) -> list[float]:
    """``predict.class_score_thresholds`` of a model of ``num_classes`` classes from the file's entry; a class it
    does not name keeps ``default``; a class beyond ``num_classes`` is an error (a file of another model)."""
    if not isinstance(stored, dict):
        raise ValueError(f"{PER_CLASS_KEY} is a {type(stored).__name__}, not a mapping")
    values = [default] * num_classes
    for key, value in stored.items():
        k = int(key)
        if not 1 <= k <= num_classes:
            raise ValueError(f"{PER_CLASS_KEY}: class {key!r}, but the model has {num_classes} classes")
        if not 0.0 <= float(value) < 1.0:
            raise ValueError(f"{PER_CLASS_KEY}: class {key!r} threshold {value!r}")
        values[k - 1] = float(value)
    return values


def _read_thresholds(path: Path) -> dict:
    if not path.is_file():
        raise DataFormatError(f"{path}: no thresholds file (run the tune stage: dvc repro tune)")
    try:
        stored = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise _not_a_thresholds_file(path, err) from None
    if not isinstance(stored, dict):
        raise _not_a_thresholds_file(path, f"a {type(stored).__name__}, not a mapping")
    return stored


def _not_a_thresholds_file(path: Path, why: object) -> DataFormatError:
    return DataFormatError(f"{path}: not a thresholds file ({why}); rerun the tune stage or delete the file")


def tuned_predict_params(
    params: PredictParams, thresholds_path: str | Path | None, num_classes: int
) -> PredictParams:
    """``params`` with the thresholds stored in ``thresholds_path`` (``None``: the params' own values), for a
    model of ``num_classes`` classes."""
    if thresholds_path is None:
        return params
    path = Path(thresholds_path)
    stored = _read_thresholds(path)
    try:
        values = {key: float(stored[key]) for key in TUNED_KEYS}
        if PER_CLASS_KEY in stored:  # a file written before per-class tuning keeps the params' own
            values["class_score_thresholds"] = _per_class(
                stored[PER_CLASS_KEY], values["label_score_threshold"], num_classes
            )
    except (KeyError, TypeError, ValueError) as err:
        raise _not_a_thresholds_file(path, err) from None
    return replace(params, **values)


def tuned_postproc_params(postproc: PostprocParams, thresholds_path: str | Path | None) -> PostprocParams:
    """``postproc`` at the peak threshold stored in ``thresholds_path``, ``recover_threshold`` scaled with it
    (``None``, or a file without ``peak_threshold``: the params' own values)."""
    if thresholds_path is None:
        return postproc
    path = Path(thresholds_path)
    stored = _read_thresholds(path)
    if PEAK_KEY not in stored:
        return postproc
    try:
        peak = float(stored[PEAK_KEY])
    except (TypeError, ValueError) as err:
        raise _not_a_thresholds_file(path, f"{PEAK_KEY}: {err}") from None
    if not 0.0 < peak < 1.0:
        raise _not_a_thresholds_file(path, f"{PEAK_KEY} {peak!r} is not a probability in (0, 1)")
    return postproc.at_peak_threshold(peak)
