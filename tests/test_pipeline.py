"""The DVC workflow for real: the project copied into a fresh git repo, `dvc repro`, `dvc exp run -S …`,
`dvc exp show`, `dvc metrics diff` and `dvc plots diff`, with tiny parameters."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, tiny_params

pytestmark = pytest.mark.slow

COPIED = ("dvc.yaml", "stages", "src", ".dvc/config", ".dvc/.gitignore", ".gitignore", ".dvcignore")


def _run(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "PATH": f"{Path(os.sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    result = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{output[-5000:]}"
    return output


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The project in a new git repository with tiny params, after a first `dvc repro`, all committed."""
    repo = tmp_path_factory.mktemp("project")
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif source.exists():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, repo / name)
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params().to_dict(), sort_keys=False))
    _run(repo, "git", "init", "-q")
    _run(
        repo, "git", "config", "user.name", "cellseg test"
    )  # dvc exp run commits too: no global identity needed
    _run(repo, "git", "config", "user.email", "test@cellseg.invalid")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "tiny project")
    repro = _run(repo, "dvc", "repro")
    for stage in ("synth", "prepare", "maps", "train", "evaluate", "submit"):
        assert f"Running stage '{stage}'" in repro
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "baseline run")
    return repo


def test_repro_produces_metrics_plots_and_submission(repo: Path) -> None:
    metrics = json.loads((repo / "metrics" / "eval.json").read_text())
    for key in (
        "map",
        "map_50",
        "map_75",
        "map_50_at_100",
        "ap50_class1",
        "map_small",
        "pq",
        "mpq_plus",
        "aji",
    ):
        assert key in metrics
    assert (repo / "metrics" / "eval_per_image.csv").read_text().startswith("name,n_true,n_pred,pq,")
    with zipfile.ZipFile(repo / "submission" / "submission.zip") as archive:
        assert archive.namelist() == ["test-results.json"]
    assert sorted(p.name for p in (repo / "plots" / "eval" / "pr").iterdir()) == [
        f"class{k}.csv" for k in range(1, 5)
    ]
    assert list((repo / "plots" / "eval" / "overlays").glob("*.png"))
    shown = _run(repo, "dvc", "metrics", "show")
    assert "metrics/eval.json" in shown and "map_50" in shown
    assert "Data and pipelines are up to date" in _run(repo, "dvc", "repro")


def test_a_changed_test_split_reruns_submit_only(repo: Path) -> None:
    """A new test set must not rebuild the maps or retrain: train and maps depend on prepared train/val only."""
    test_npz = sorted((repo / "data" / "prepared" / "test").glob("*.npz"))[0]
    original = test_npz.read_bytes()
    try:
        test_npz.write_bytes(original + b"\0")  # as if prepare had written a different test image
        status = json.loads(_run(repo, "dvc", "status", "--json"))
    finally:
        test_npz.write_bytes(original)
    assert "submit" in status and "prepare" in status  # prepare's output changed; submit reads it
    for stage in ("maps", "train", "evaluate"):
        assert stage not in status, f"{stage} would rerun: {status.get(stage)}"
    assert "Data and pipelines are up to date" in _run(repo, "dvc", "repro")


def test_experiment_reruns_only_what_the_param_touches(repo: Path) -> None:
    output = _run(repo, "dvc", "exp", "run", "-S", "aux.w_boundary=0.2")
    assert "Running stage 'train'" in output and "Running stage 'evaluate'" in output
    for stage in ("synth", "prepare", "maps"):
        assert f"Running stage '{stage}'" not in output
    assert yaml.safe_load((repo / "params.yaml").read_text())["aux"]["w_boundary"] == 0.2
    assert "aux.w_boundary" in _run(repo, "dvc", "params", "diff")

    shown = json.loads(_run(repo, "dvc", "exp", "show", "--json"))
    metric_names = set()
    for row in shown:
        for exp in [row, *(e for x in row.get("experiments") or [] for e in x.get("revs", []))]:
            for metric_file in (exp.get("data") or {}).get("metrics", {}).values():
                metric_names |= set(metric_file.get("data", {}))
    assert {"map", "map_50"} <= metric_names
    table = _run(repo, "dvc", "exp", "show", "--no-pager", "--md")
    assert "map_50" in table and "aux.w_boundary" in table

    diff = _run(repo, "dvc", "metrics", "diff", "--md", "--all")
    assert "metrics/eval.json" in diff and "| map " in diff and "map_50" in diff
    assert "| pq " in diff and "mpq_plus" in diff and "dice2" in diff


def test_plots_diff_overlays_both_runs_curves(repo: Path) -> None:
    rendered = json.loads(_run(repo, "dvc", "plots", "diff", "HEAD", "workspace", "--json"))["data"]
    assert any("Training loss" in name for name in rendered)
    assert any("Validation mAP" in name for name in rendered)
    assert any("Validation PQ" in name for name in rendered)
    loss = next(v for k, v in rendered.items() if "Training loss" in k)
    revisions = {rev for plot in loss for rev in plot.get("revisions", [])}
    assert {"HEAD", "workspace"} <= revisions


def test_a_postproc_switch_reruns_only_evaluate_and_submit(repo: Path) -> None:
    """Map-guided post-processing is tuned on a trained model: the training validation scores raw detections."""
    output = _run(repo, "dvc", "exp", "run", "-S", "postproc.split=true", "-S", "postproc.rescore=true")
    assert "Running stage 'evaluate'" in output and "Running stage 'submit'" in output
    for stage in ("synth", "prepare", "maps", "train"):
        assert f"Running stage '{stage}'" not in output
