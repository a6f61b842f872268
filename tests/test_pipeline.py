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

from cellseg.params import TRACE_ENV
from conftest import ROOT, tiny_params

pytestmark = pytest.mark.slow

COPIED = ("dvc.yaml", "stages", "src", ".dvc/config", ".dvc/.gitignore", ".gitignore", ".dvcignore")


def _run(repo: Path, *args: str, env: dict | None = None) -> str:
    env = {
        **os.environ,
        **(env or {}),
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
    # every map-guided step on: the stages then read every postproc key (test_each_stage_lists_the_params_it_reads)
    steps = {f"postproc__{step}": True for step in ("split", "trim", "recover", "rescore")}
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params(**steps).to_dict(), sort_keys=False))
    _run(repo, "git", "init", "-q")
    _run(
        repo, "git", "config", "user.name", "cellseg test"
    )  # dvc exp run commits too: no global identity needed
    _run(repo, "git", "config", "user.email", "test@cellseg.invalid")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "tiny project")
    repro = _run(repo, "dvc", "repro", env={TRACE_ENV: str(repo.parent / f"{repo.name}-params-read")})
    for stage in (
        "synth",
        "prepare",
        "maps",
        "train",
        "tune",
        "evaluate",
        "submit",
        "synth_slides",
        "import",
        "ood@demo_slide",
        "ood_summary",
    ):
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
    ood = json.loads((repo / "metrics" / "ood.json").read_text())  # the demo's out-of-domain set: its slide
    assert set(ood) == {"demo_slide", "pooled"} and ood["pooled"]["n_true"] > 0
    assert ood["pooled"]["n_true"] == ood["demo_slide"]["n_true"] and "metrics/ood.json" in shown
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


def _params_listed(stage: dict, params: dict) -> set[str]:
    """The keys a dvc.yaml stage lists: ``section.key`` and a top-level value (``classes``) as they are, a whole
    ``section`` as each of its keys."""
    keys = set()
    for entry in stage.get("params", []):
        whole_section = "." not in entry and isinstance(params[entry], dict)
        keys |= {f"{entry}.{k}" for k in params[entry]} if whole_section else {entry}
    return keys


UNSEEN_IN_THE_TRACED_RUN = {
    "train": {
        "augment.stain_method": "read only when augment.stain_p > 0 (0 in the tiny run)",
        "augment.stain_scale": "read only when augment.stain_p > 0",
        "augment.stain_shift": "read only when augment.stain_p > 0",
        "augment.scale_min": "read only when augment.scale_p > 0 (0 in the tiny run)",
        "augment.scale_max": "read only when augment.scale_p > 0",
        "model.trainable_layers": "read only with pretrained weights (model.pretrained: none here)",
        "train.budget_scope": "read only with a time budget (train.time_budget_min > 0)",
    },
    "tune": {
        "predict.label_score_threshold": "stored as it is only with tune.enabled: false",
        "predict.class_score_thresholds": "stored as it is only with tune.enabled: false",
        "postproc.recover_class": "read only for a recovered cell with no detection to vote on its class",
    },
    "evaluate": {"postproc.recover_class": "read only for a recovered cell with no detection to vote"},
    "submit": {"postproc.recover_class": "read only for a recovered cell with no detection to vote"},
    "ood": {"postproc.recover_class": "read only for a recovered cell with no detection to vote"},
    "import": {
        "import.input_dir": "read by DVC itself: ${import.input_dir} in the stage's cmd and deps",
    },
    "slides": {
        "slide.input_dir": "read by DVC itself: ${slide.input_dir} in the stage's cmd and deps",
        "slide.retries": "read only with a Dask cluster (--workers > 1 or --scheduler)",
        "data.mpp": "read only for a checkpoint that does not record its training resolution",
    },
}
"""Keys a stage reads only under settings the traced run does not use: listed in dvc.yaml all the same."""


def test_each_stage_lists_exactly_the_params_it_reads(repo: Path) -> None:
    """The baseline `dvc repro` ran with CELLSEG_PARAMS_TRACE: each stage recorded the keys it read. dvc.yaml
    must list those and no others, so a change reruns exactly the stages that read it."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    traces = repo.parent / f"{repo.name}-params-read"
    wrong = []
    for name, stage in stages.items():
        stage = stage.get("do", stage)  # a foreach stage's template
        script = Path(stage["cmd"].split()[1]).stem
        read = set(json.loads((traces / f"{script}.json").read_text()))
        unseen = set(UNSEEN_IN_THE_TRACED_RUN.get(name, {}))
        assert not read & unseen, (
            f"{name} read {sorted(read & unseen)}: drop them from UNSEEN_IN_THE_TRACED_RUN"
        )
        read |= unseen
        listed = _params_listed(stage, params)
        if read - listed:
            wrong.append(f"{name} reads params that dvc.yaml does not list: {sorted(read - listed)}")
        if listed - read:
            wrong.append(f"{name} lists params that it does not read: {sorted(listed - read)}")
    assert not wrong, "\n".join(wrong)


def _reruns(repo: Path, *overrides: str) -> set[str]:
    """The stages `dvc status` says a change of params.yaml would rerun (params.yaml restored after)."""
    original = (repo / "params.yaml").read_text()
    try:
        params = yaml.safe_load(original)
        for override in overrides:
            dotted, value = override.split("=", 1)
            *parents, key = dotted.split(".")
            node = params
            for parent in parents:
                node = node[parent]
            node[key] = yaml.safe_load(value)
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        return set(json.loads(_run(repo, "dvc", "status", "--json")))
    finally:
        (repo / "params.yaml").write_text(original)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (("tune.score_grid=[0.4, 0.5]",), {"tune"}),  # evaluate and submit follow once tune's output changes
        (("postproc.rescore=false",), {"tune", "evaluate", "submit", "ood@demo_slide"}),
        (("predict.device=cpu",), {"tune", "evaluate", "submit", "slides", "ood@demo_slide"}),
        (("evaluate.n_overlays=2",), {"evaluate"}),
        (("evaluate.ood.demo_slide.mpp=0.25",), {"ood@demo_slide", "ood_summary"}),
        (("aux.w_boundary=0.3",), {"train"}),  # 0.2 is the workspace's since the experiment test
        (
            ("predict.tile_overlap=16",),
            {"train", "tune", "evaluate", "submit", "slides", "ood@demo_slide"},
        ),  # validation tiles too
        # the stages that read `classes`; the rest take them from the checkpoint
        (("classes=[tumour, lymphocyte, stroma, other]",), {"import", "prepare", "train"}),
    ],
)
def test_a_param_change_reruns_only_the_stages_that_read_it(
    repo: Path, overrides: tuple, expected: set
) -> None:
    assert _reruns(repo, *overrides) == expected


def test_a_postproc_code_edit_reruns_no_training(repo: Path) -> None:
    source = repo / "src" / "cellseg" / "infer" / "postproc.py"
    original = source.read_text()
    try:
        source.write_text(original + "\n# an edit\n")
        status = set(json.loads(_run(repo, "dvc", "status", "--json")))
    finally:
        source.write_text(original)
    assert status == {"tune", "evaluate", "submit", "ood@demo_slide"}  # the stages that post-process


def test_a_postproc_switch_reruns_tune_evaluate_and_submit_only(repo: Path) -> None:
    """Map-guided post-processing is tuned on a trained model: the training validation scores raw detections."""
    output = _run(repo, "dvc", "exp", "run", "-S", "postproc.split=false", "-S", "postproc.rescore=false")
    for stage in ("tune", "evaluate", "submit"):
        assert f"Running stage '{stage}'" in output
    for stage in ("synth", "prepare", "maps", "train"):
        assert f"Running stage '{stage}'" not in output


def test_the_loop_predict_correct_import_retrain_compare(repo: Path) -> None:
    """Issue 27's loop on the tiny model: `cellseg slide` → its GeoJSON corrected (nuclei removed, one
    reclassified) → `cellseg import` → `dvc exp run` from the model on the corrections → `dvc exp show`."""
    from cellseg.data.io import list_train_samples, read_train_sample

    _run(repo, "cellseg", "slide", "models/best.pt", "data/demo_slides/demo_slide.tif", "--out", "loop/predicted",
         "--no-progress")  # fmt: skip
    features = json.loads((repo / "loop/predicted/demo_slide/nuclei.geojson").read_text())["features"]
    assert len(features) >= 10
    corrected = features[3:]  # three false nuclei deleted in QuPath
    name = corrected[0]["properties"]["classification"]["name"]
    other = "class3" if name != "class3" else "class1"
    corrected[0]["properties"]["classification"]["name"] = other  # and one reclassified
    folder = repo / "loop" / "corrected"
    folder.mkdir()
    shutil.copy(repo / "data/demo_slides/demo_slide.tif", folder / "demo_slide.tif")
    (folder / "demo_slide.geojson").write_text(
        json.dumps({"type": "FeatureCollection", "features": corrected})
    )

    out = _run(
        repo, "cellseg", "import", "loop/corrected/demo_slide.tif", "--out", "loop/raw", "--no-progress"
    )
    assert f"{len(corrected)} of {len(corrected)} nuclei" in out
    record = json.loads((repo / "loop/raw/import.json").read_text())
    assert {s["annotation"] for s in record["samples"]} == {"loop/corrected/demo_slide.geojson"}
    # the reclassified nucleus is in its new class where its centre lies
    from shapely.geometry import shape

    x, y = shape(corrected[0]["geometry"]).representative_point().coords[0]
    k = int(other[-1]) - 1
    found = False
    samples = {s.name: s for s in list_train_samples(repo / "loop/raw", 4)}
    for s in record["samples"]:
        if s["x0"] <= x < s["x0"] + s["width"] and s["y0"] <= y < s["y0"] + s["height"]:
            _, labels = read_train_sample(samples[s["sample"]])
            found = labels[k][int(y - s["y0"]), int(x - s["x0"])] > 0
    assert found

    # up to evaluate: an import has no test side for submit
    run = _run(repo, "dvc", "exp", "run", "-n", "corrected", "-S", "data.raw_dir=loop/raw",
               "-S", "model.pretrained=models/best.pt", "evaluate")  # fmt: skip
    for stage in ("prepare", "maps", "train", "evaluate"):
        assert f"Running stage '{stage}'" in run
    assert "model.pretrained=models/best.pt: " in run and "tensors loaded" in run
    table = _run(repo, "dvc", "exp", "show", "--no-pager", "--md")
    assert "corrected" in table and "loop/raw" in table and "pq" in table
