"""params.yaml loading: every mistake in a real params file is a ParamsError naming the key, never a traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cellseg.params import ParamsError, load_params
from conftest import ROOT


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    return path


@pytest.mark.parametrize("text", ["", "# only a comment\n", "- a\n- list\n", "just a string\n"])
def test_empty_or_non_mapping_file_is_named(params_file: Path, text: str) -> None:
    params_file.write_text(text)
    with pytest.raises(ParamsError, match=r"params\.yaml: expected a mapping of sections"):
        load_params(params_file, overrides={"train.epochs": 2})


@pytest.mark.parametrize(
    ("dotted", "where"),
    [("train.epochs.value", "train.epochs"), ("data.raw_dir.x.y", "data.raw_dir")],
)
def test_override_below_a_value_is_named(params_file: Path, dotted: str, where: str) -> None:
    with pytest.raises(ParamsError, match=rf"cannot set {dotted}: {where} is .*, not a mapping"):
        load_params(params_file, overrides={dotted: 1})


@pytest.mark.parametrize(
    "key",
    ["train.lr", "aux.w_center", "aux.w_boundary", "model.scale", "train.grad_clip", "maps.center_sigma"],
)
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_numbers_are_rejected(params_file: Path, key: str, value: float) -> None:
    section, leaf = key.split(".")
    text = params_file.read_text()
    params_file.write_text(
        text.replace(f"\n  {leaf}:", f"\n  {leaf}: {'.inf' if value > 0 else '.nan'} #", 1)
    )
    with pytest.raises(ParamsError, match=rf"{key} must be a finite number"):
        load_params(params_file)


def test_score_threshold_below_the_models_own_is_contradictory(params_file: Path) -> None:
    with pytest.raises(
        ParamsError, match=r"predict\.score_threshold \(0\.01\) is below model\.box_score_thresh"
    ):
        load_params(params_file, overrides={"predict.score_threshold": 0.01, "model.box_score_thresh": 0.05})
    both = load_params(
        params_file, overrides={"predict.score_threshold": 0.01, "model.box_score_thresh": 0.01}
    )
    assert both.predict.score_threshold == 0.01


def test_image_cap_above_the_forward_cap_is_allowed(params_file: Path) -> None:
    """Documented, not contradictory: ``model.box_detections_per_img`` caps one forward pass (one tile) and
    ``predict.max_per_image`` the merged tiles of an image, which hold more cells than one tile."""
    params = load_params(
        params_file, overrides={"model.box_detections_per_img": 500, "predict.max_per_image": 3000}
    )
    assert params.predict.max_per_image > params.model.box_detections_per_img


def test_stage_script_reports_a_bad_params_file_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("")
    run = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "synth.py"), "out"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert (
        run.stderr.strip().splitlines()[-1].startswith("error: params.yaml: expected a mapping of sections")
    )


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("tune.peak_grid", [], r"tune\.peak_grid needs at least one value"),
        ("tune.mask_grid", [0.2, 1.0], r"tune\.mask_grid values must be in \(0, 1\)"),
        ("tune.score_grid", [0.01, 0.5], r"tune\.score_grid values must be >= predict\.score_threshold"),
        ("predict.device", "tpu", r"predict\.device must be one of auto, cpu, cuda, mps"),
    ],
)
def test_tune_grids_and_the_inference_device_are_checked(
    params_file: Path, key: str, value: object, message: str
) -> None:
    with pytest.raises(ParamsError, match=message):
        load_params(params_file, overrides={key: value})
