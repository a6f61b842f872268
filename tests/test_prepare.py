"""The prepare stage: lossless tif → npz conversion, the deterministic split, the summary, atomic output."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellseg.data.io import DataFormatError, list_train_samples, load_npz, write_image_tif
from cellseg.data.prepare import prepare_dataset, split_train_val
from cellseg.params import load_params
from conftest import ROOT, make_raw_dataset

DATA_PARAMS = load_params(ROOT / "params.yaml").data
CLASSES = load_params(ROOT / "params.yaml").classes


def _prepare(raw: Path, tmp_path: Path) -> tuple[Path, dict]:
    out = tmp_path / "prepared"
    summary = prepare_dataset(raw, out, tmp_path / "split.json", tmp_path / "data.json", DATA_PARAMS, CLASSES)
    return out, summary


def _instance_masks_from_tifs(folder: Path) -> dict[tuple[int, int], np.ndarray]:
    """Every instance of a raw sample, straight from the tifs: (class, id) → full-image mask."""
    masks = {}
    for k in range(1, 5):
        path = folder / f"class{k}.tif"
        if path.exists():
            labels = tifffile.imread(path)
            for instance_id in np.unique(labels)[1:]:
                masks[(k, int(instance_id))] = labels == instance_id
    return masks


def _assert_lossless(raw: Path, prepared: Path) -> int:
    n_instances = 0
    for sample in list_train_samples(raw, len(CLASSES)):
        (npz,) = list(prepared.glob(f"*/{sample.name}.npz"))
        arrays = load_npz(npz)
        np.testing.assert_array_equal(arrays["image"], tifffile.imread(sample.image_path)[..., :3])
        expected = _instance_masks_from_tifs(sample.image_path.parent)
        got = {
            (k + 1, int(i)): row == i for k, row in enumerate(arrays["labels"]) for i in np.unique(row)[1:]
        }
        assert got.keys() == expected.keys()
        for key, mask in expected.items():
            np.testing.assert_array_equal(got[key], mask, err_msg=f"{sample.name} instance {key}")
        n_instances += len(expected)
    return n_instances


def test_real_fixture_converts_losslessly(real_fixture: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "train").symlink_to(real_fixture / "train")  # read in place, never copied
    prepared, summary = _prepare(raw, tmp_path)
    assert _assert_lossless(raw, prepared) == 161
    assert summary["instances"] == {"class1": 2, "class2": 159, "class3": 0, "class4": 0}
    assert summary["instances_per_image"]["max"] == 161
    assert summary["image_height"]["max"] == 397 and summary["image_width"]["max"] == 482


def test_synthetic_dataset_converts_losslessly_with_test_side(tmp_path: Path) -> None:
    raw = make_raw_dataset(tmp_path / "raw", n_train=5, n_test=2)
    prepared, summary = _prepare(raw, tmp_path)
    assert _assert_lossless(raw, prepared) == 3 * 5 + 2 * 3
    tests = sorted(prepared.glob("test/*.npz"))
    assert [p.stem for p in tests] == ["test-00", "test-01"]
    first = load_npz(tests[0])
    assert int(first["image_id"]) == 1 and first["image"].shape == (48, 64, 3)
    split = json.loads((tmp_path / "split.json").read_text())
    assert sorted(split["train"] + split["val"]) == [f"sample-{i:02d}" for i in range(5)]
    assert len(split["val"]) == 1 == summary["n_val"]
    assert summary["n_test"] == 2
    assert json.loads((tmp_path / "data.json").read_text()) == summary


def test_split_is_deterministic_stable_and_never_empties_train() -> None:
    names = [f"s{i}" for i in range(50)]
    a = split_train_val(names, 0.2, seed=0)
    assert a == split_train_val(list(reversed(names)), 0.2, seed=0)
    assert len(a["val"]) == 10 and not set(a["val"]) & set(a["train"])
    assert a != split_train_val(names, 0.2, seed=1)
    grown = split_train_val([*names, "s50"], 0.2, seed=0)
    assert len(set(a["val"]) ^ set(grown["val"])) <= 2  # adding a sample barely moves the others
    assert split_train_val(["only"], 0.5, seed=0) == {"train": ["only"], "val": []}
    assert len(split_train_val(["a", "b"], 0.01, seed=0)["val"]) == 1


def test_group_split_keeps_every_source_image_on_one_side() -> None:
    # 20 source images of 16 tiles each, named like consep-dev's tiles: train_<image>_<tile>
    names = [f"train_{image}_{tile:03d}" for image in range(1, 21) for tile in range(16)]
    split = split_train_val(names, 0.2, seed=0, group_regex=r"^(train_\d+)_")
    group_of = {n: n.rsplit("_", 1)[0] for n in names}
    val_groups = {group_of[n] for n in split["val"]}
    train_groups = {group_of[n] for n in split["train"]}
    assert val_groups and not val_groups & train_groups
    assert len(split["val"]) == 64  # 4 whole images: round(320 * 0.2) reached exactly
    assert sorted(split["train"] + split["val"]) == sorted(names)
    # the plain hash split of the same names mixes tiles of one image across the sides
    plain = split_train_val(names, 0.2, seed=0)
    assert {group_of[n] for n in plain["val"]} & {group_of[n] for n in plain["train"]}


def test_group_split_without_a_match_falls_back_to_one_group_per_sample() -> None:
    names = [f"s{i}" for i in range(50)]
    assert split_train_val(names, 0.2, seed=0, group_regex=r"^(train_\d+)_") == split_train_val(names, 0.2, 0)
    # a single group cannot be split: it all trains
    assert split_train_val(["t_1_a", "t_1_b"], 0.5, seed=0, group_regex=r"^(t_\d+)_")["val"] == []


def test_invalid_group_regex_is_a_params_error(tmp_path: Path) -> None:
    from cellseg.params import DataParams, ParamsError

    with pytest.raises(ParamsError, match="data.group_regex"):
        DataParams(raw_dir="x", val_fraction=0.2, seed=0, group_regex="(unclosed", mpp=0.25)


def test_failure_leaves_no_partial_output_and_keeps_previous(tmp_path: Path) -> None:
    raw = make_raw_dataset(tmp_path / "raw", n_train=4)
    prepared, _ = _prepare(raw, tmp_path)
    before = sorted(p.relative_to(prepared) for p in prepared.rglob("*"))
    (raw / "train" / "sample-03" / "class2.tif").write_bytes(b"not a tif")
    with pytest.raises(DataFormatError, match=r"sample-03/class2\.tif"):
        _prepare(raw, tmp_path)
    assert sorted(p.relative_to(prepared) for p in prepared.rglob("*")) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prepared")]
    fresh = tmp_path / "fresh"
    with pytest.raises(DataFormatError):
        prepare_dataset(raw, fresh, tmp_path / "s.json", tmp_path / "d.json", DATA_PARAMS, CLASSES)
    assert not fresh.exists()


def test_mapping_size_must_match_the_test_image(tmp_path: Path) -> None:
    raw = make_raw_dataset(tmp_path / "raw", n_test=1)
    write_image_tif(raw / "test_release" / "test-00.tif", np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(DataFormatError, match=r"test-00\.tif: image is 10×10 but the mapping says 48×64"):
        _prepare(raw, tmp_path)


def test_stage_script_reports_bad_input_in_one_line(tmp_path: Path) -> None:
    """A user's mistake ends with `error: <file>: <problem>` and exit code 1, not a traceback."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    run = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "prepare.py"), "missing-raw", "out", "s.json", "d.json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    assert (
        run.stderr.strip().splitlines()[-1] == "error: missing-raw/train: missing folder "
        "(expected <raw>/train/<sample>/image.tif)"
    )
    assert "Traceback" not in run.stderr and not (tmp_path / "out").exists()
