"""`classes`: the class names in params.yaml, as many as the data has, end to end with six classes (prepare ->
train -> tune -> evaluate -> `cellseg predict` and the slide outputs), and the checks around them."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cellseg import DEFAULT_CLASSES
from cellseg.data.io import load_npz
from cellseg.instances import Instances
from cellseg.model.checkpoint import ResumeError, checkpoint_classes, read_checkpoint, resume_changes
from cellseg.params import TRACE_ENV, ParamsError
from conftest import ROOT, tiny_params

SIX = ["tumour", "lymphocyte", "stroma", "other", "necrosis", "mitotic figure"]
RENAMED = {
    1: 5,
    3: 6,
}  # on every other synthetic sample, class1.tif -> class5.tif and class3.tif -> class6.tif


def _stage(name: str):
    """A stage script as a module (its ``main`` reads params.yaml from the current folder)."""
    spec = importlib.util.spec_from_file_location(f"stage_{name}_classes", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def six(tmp_path_factory) -> dict:
    """A tiny project of six classes: the synthetic data with classes 5 and 6 made of renamed class files,
    prepared by the stage script (params traced), its maps, and the tiny model trained for one epoch."""
    from cellseg.data.maps import write_maps
    from cellseg.data.synth import write_dataset
    from cellseg.fsutil import atomic_dir
    from cellseg.train.loop import TrainPaths, train

    root = tmp_path_factory.mktemp("six")
    params = tiny_params(classes=SIX, tune__class_score_grid=[0.05, 0.3])
    (root / "params.yaml").write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
    with atomic_dir(root / "raw") as tmp:
        write_dataset(tmp, params.synth)
    for folder in sorted((root / "raw" / "train").iterdir())[::2]:
        for old, new in RENAMED.items():
            if (folder / f"class{old}.tif").exists():
                (folder / f"class{old}.tif").rename(folder / f"class{new}.tif")
    run = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "prepare.py"), "raw", "prepared", "split.json", "data.json"],
        cwd=root,
        env={**os.environ, TRACE_ENV: str(root / "trace")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    write_maps(root / "prepared", root / "maps", root / "previews", params.maps)
    train(params, TrainPaths(root / "prepared", root / "maps", root / "models", root / "live"))
    return {"root": root, "params": params}


def test_prepare_reads_classes_and_writes_one_label_row_per_class(six) -> None:
    root = six["root"]
    assert "classes" in json.loads((root / "trace" / "prepare.json").read_text())  # listed in dvc.yaml
    summary = json.loads((root / "data.json").read_text())
    assert list(summary["instances"]) == SIX  # the data summary names the classes
    assert summary["instances"]["necrosis"] > 0 and summary["instances"]["mitotic figure"] > 0
    for path in sorted((root / "prepared").glob("*/*.npz")):
        if path.parent.name != "test":
            assert load_npz(path)["labels"].shape[0] == 6


def test_the_model_learns_six_classes_and_its_checkpoint_names_them(six) -> None:
    from cellseg import CellsegError
    from cellseg.model.bundle import open_model

    best = six["root"] / "models" / "best.pt"
    assert read_checkpoint(best)["params"]["classes"] == SIX
    bundle = open_model(best, six["params"], thresholds=None)
    assert bundle.class_names == tuple(SIX) and bundle.num_classes == 6
    heads = bundle.network.roi_heads
    assert heads.box_predictor.cls_score.out_features == 7  # K + 1 with the background
    assert heads.box_predictor.bbox_pred.out_features == 4 * 7
    assert heads.mask_predictor.mask_fcn_logits.out_channels == 7
    # params.yaml of another project (the default four classes): the checkpoint's six still decide
    four = tiny_params(predict__class_score_thresholds=[0.5] * 4)
    assert open_model(best, tiny_params(), thresholds=None).class_names == tuple(SIX)
    with pytest.raises(
        CellsegError, match=r"class_score_thresholds has 4 values, but .*best\.pt has 6 classes"
    ):
        _ = open_model(best, four, thresholds=None).predict


def test_tune_evaluate_and_predict_follow_the_checkpoints_classes(
    six, tmp_path: Path, monkeypatch, capsys
) -> None:
    root = six["root"]
    monkeypatch.chdir(root)
    _stage("tune").main(["models/best.pt", "prepared/val", "models/thresholds.json"])
    tuned = json.loads((root / "models" / "thresholds.json").read_text())
    assert list(tuned["label_score_threshold_per_class"]) == ["1", "2", "3", "4", "5", "6"]

    _stage("evaluate").main(
        [
            "models/best.pt",
            "models/thresholds.json",
            "prepared/val",
            "pred",
            "eval.json",
            "plots",
            "--maps",
            "maps/val",
        ]
    )
    shown = capsys.readouterr().out
    assert "necrosis" in shown and "mitotic figure" in shown  # the summary names the classes
    metrics = json.loads((root / "eval.json").read_text())
    for key in ("map_class", "ap50_class", "pq_class", "f1_class", "pq_score_threshold_class"):
        assert [k for k in metrics if k.startswith(key) and k[len(key) :].isdigit()] == [
            f"{key}{k}" for k in range(1, 7)
        ], key  # numbered keys: `dvc metrics diff` lines up with four-class runs
    assert sorted(p.name for p in (root / "plots" / "pr").iterdir()) == [f"class{k}.csv" for k in range(1, 7)]
    with open(root / "plots" / "confusion.csv") as f:
        confusion = list(csv.DictReader(f))
    assert confusion and {v for row in confusion for v in row.values()} <= {*SIX, "background"}

    (tmp_path / "in").mkdir()
    for i, path in enumerate(sorted((root / "prepared" / "test").glob("*.npz"))[:2]):
        Image.fromarray(load_npz(path)["image"]).save(tmp_path / "in" / f"img-{i}.png")
    from cellseg.infer import folder

    folder.main(["models/best.pt", str(tmp_path / "in"), str(tmp_path / "out")])
    counts = json.loads(capsys.readouterr().out.split("\n", 1)[1])  # after the thresholds line
    assert all(list(c) == SIX for c in counts.values())  # counted by name
    written = {p.name for p in (tmp_path / "out").glob("*/*.tif")}
    assert written <= {f"class{k}.tif" for k in range(1, 7)}
    provenance = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert provenance["trained_params"]["classes"] == SIX


def test_slide_outputs_name_and_colour_every_class(six, tmp_path: Path) -> None:
    """The GeoJSON classification and the table's class column carry the checkpoint's names; classes beyond
    the fourth get tab20's colours."""
    from cellseg.model.bundle import open_model
    from cellseg.outputs import Nuclei, SinkContext, open_sinks
    from cellseg.outputs.base import CLASS_COLOURS, TAB20, class_colour

    names = open_model(six["root"] / "models" / "best.pt", six["params"], thresholds=None).class_names
    squares = [np.ones((4, 4), bool)] * 3
    inst = Instances(
        30,
        30,
        np.array([2, 5, 6]),
        np.array([0.9, 0.8, 0.7], np.float32),
        np.array([[1, 1], [10, 10], [20, 20]]),
        squares,
    )
    with open_sinks(["geojson", "csv"], SinkContext(tmp_path, "s", mpp=0.5, class_names=names)) as sinks:
        for sink in sinks:
            sink.add(Nuclei(inst, np.array([1, 2, 3])))
    features = json.loads((tmp_path / "nuclei.geojson").read_text())["features"]
    assert [f["properties"]["classification"]["name"] for f in features] == [
        "lymphocyte",
        "necrosis",
        "mitotic figure",
    ]
    assert [tuple(f["properties"]["classification"]["color"]) for f in features] == [
        CLASS_COLOURS[2],
        TAB20[0],
        TAB20[1],
    ]
    with open(tmp_path / "nuclei.csv") as f:
        assert [row["class"] for row in csv.DictReader(f)] == ["lymphocyte", "necrosis", "mitotic figure"]
    assert class_colour(4 + 20 + 1) == TAB20[0]  # the palette cycles


def test_a_classes_change_blocks_resume(six, tmp_path: Path) -> None:
    from cellseg.train.loop import TrainPaths, train

    root = six["root"]
    shutil.copytree(root / "models", tmp_path / "models")
    renamed = [*SIX[:5], "mitosis"]  # same number of classes, another name: other predictor outputs
    params = tiny_params(classes=renamed, train__resume=True, train__epochs=2)
    paths = TrainPaths(root / "prepared", root / "maps", tmp_path / "models", tmp_path / "live")
    with pytest.raises(
        ResumeError, match=r"cannot resume: classes \[.*'mitotic figure'\] -> \[.*'mitosis'\]"
    ):
        train(params, paths)
    # a checkpoint saved before `classes` existed was trained on the four defaults
    old = {k: v for k, v in tiny_params().to_dict().items() if k != "classes"}
    assert checkpoint_classes({"params": old}) == DEFAULT_CLASSES
    assert resume_changes(old, tiny_params(), Path("last.pt")) == ({}, {})
    with pytest.raises(ResumeError, match="classes"):
        resume_changes(old, tiny_params(classes=SIX), Path("last.pt"))


def test_prepared_data_of_other_classes_is_stale(six, tmp_path: Path) -> None:
    """Four-class params against the six-class prepared data: training and evaluation refuse it by name."""
    from cellseg.data.io import DataFormatError
    from cellseg.eval.score_model import load_labelled
    from cellseg.train.loop import TrainPaths, train

    root = six["root"]
    paths = TrainPaths(root / "prepared", root / "maps", tmp_path / "models", tmp_path / "live")
    with pytest.raises(DataFormatError, match=r"labels of shape \(6, .*the model learns 4 classes"):
        train(tiny_params(), paths)
    val = sorted((root / "prepared" / "val").glob("*.npz"))[0]
    with pytest.raises(DataFormatError, match="labels of 6 classes .* but the model has 4"):
        load_labelled(val, 4)


# ------------------------------------------------------------------------------------------ the setting itself
@pytest.mark.parametrize(
    ("classes", "message"),
    [
        ([], "must name 1 to 50 classes"),
        ([f"c{i}" for i in range(51)], "must name 1 to 50 classes"),
        (["a", "b", "a"], "repeated name"),
        (["a", " b"], "is not a class name"),
        (["a", ""], "is not a class name"),
        (["a", "b\nc"], "is not a class name"),
        (["Background", "b"], "reserved"),
        ("tumour", "must be a list"),
        ([1, 2], r"classes\[0\] must be str"),
    ],
)
def test_classes_are_checked(classes, message: str) -> None:
    with pytest.raises(ParamsError, match=message):
        tiny_params(classes=classes)


def test_per_class_settings_follow_the_number_of_classes() -> None:
    assert tiny_params(classes=SIX, predict__class_score_thresholds=[0.5] * 6).predict.class_score_thresholds
    with pytest.raises(ParamsError, match=r"class_score_thresholds must be \[\] or 6 values"):
        tiny_params(classes=SIX, predict__class_score_thresholds=[0.5] * 4)
    assert tiny_params(classes=SIX, postproc__recover_class=6).postproc.recover_class == 6
    with pytest.raises(ParamsError, match=r"recover_class must be in 1\.\.2"):
        tiny_params(classes=["a", "b"], postproc__recover_class=3)


def test_reading_classes_is_traced_as_a_key(tmp_path: Path) -> None:
    """`classes` is a top-level value, not a section: a read records "classes"; loading, saving and copying
    the params record nothing."""
    code = (
        "from cellseg.params import load_params, replace\n"
        f"p = load_params({str(ROOT / 'params.yaml')!r})\n"
        "p.to_dict(); q = replace(p, data=p.data)\n"
        "assert q.classes == ['class1', 'class2', 'class3', 'class4']\n"
        "p.data.seed\n"
    )
    subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, TRACE_ENV: str(tmp_path)}, check=True, timeout=120
    )
    (trace,) = tmp_path.glob("*.json")
    assert json.loads(trace.read_text()) == ["classes", "data.seed"]


def test_cellseg_score_takes_the_classes_from_the_option_or_params_yaml(tmp_path: Path, monkeypatch) -> None:
    from cellseg.data.io import DataFormatError, TestEntry, write_label_tif
    from cellseg.eval.score_results import read_truth, score_classes
    from conftest import disk_labels

    assert score_classes("a, b,c") == ("a", "b", "c")
    with pytest.raises(ParamsError, match="--classes: repeated name"):
        score_classes("a,a")
    monkeypatch.chdir(tmp_path)
    assert score_classes(None) == DEFAULT_CLASSES  # no params.yaml here
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(classes=SIX).to_dict()))
    assert score_classes(None) == tuple(SIX)
    (tmp_path / "truth" / "x").mkdir(parents=True)
    write_label_tif(tmp_path / "truth" / "x" / "class5.tif", disk_labels((8, 8), [(4, 4)], 2, first_id=1))
    entries = [TestEntry("x.tif", 1, 8, 8)]
    with pytest.raises(DataFormatError, match=r"x/class5\.tif: class 5, but `classes` .* has 4 name"):
        read_truth(tmp_path / "truth", entries, 4)
    (truth,), missing = read_truth(tmp_path / "truth", entries, 6)
    assert truth.labels.tolist() == [5] and missing == []
