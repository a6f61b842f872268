"""The tune stage's ``thresholds.json``: written by :mod:`cellseg.eval.tune`, applied to the params here.

Every entry point that makes hard outputs (``evaluate``, ``submit``, ``cellseg predict``) reads the file through
:func:`tuned_predict_params` and :func:`tuned_postproc_params`; apart from the tuning, so that applying the
thresholds does not depend on the scoring code.
"""

from __future__ import annotations

import json
from pathlib import Path

from cellseg.data.io import DataFormatError
from cellseg.params import PostprocParams, PredictParams, replace

THRESHOLDS_FILE = "thresholds.json"
TUNED_KEYS = ("label_score_threshold", "mask_threshold")
PEAK_KEY = "peak_threshold"  # postproc.peak_threshold: stored always, tuned only with a step on and heads


def untuned(params: PredictParams, postproc: PostprocParams | None = None) -> dict:
    """The thresholds file of a run that does not tune: the params' own values."""
    stored = {"tuned": False, **{key: getattr(params, key) for key in TUNED_KEYS}}
    if postproc is not None:
        stored[PEAK_KEY] = postproc.peak_threshold
    return stored


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


def tuned_predict_params(params: PredictParams, thresholds_path: str | Path | None) -> PredictParams:
    """``params`` with the thresholds stored in ``thresholds_path`` (``None``: the params' own values)."""
    if thresholds_path is None:
        return params
    path = Path(thresholds_path)
    stored = _read_thresholds(path)
    try:
        values = {key: float(stored[key]) for key in TUNED_KEYS}
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
