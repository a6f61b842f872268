"""The maps stage: the linear-time maps equal the literal per-instance definition, and the stage writes atomically."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellseg.bench.maps import reference_maps
from cellseg.data.io import DataFormatError, list_train_samples, load_npz, read_train_sample, save_train_npz
from cellseg.data.maps import center_pixels, compute_maps, write_maps
from cellseg.params import MapsParams

ROOT = Path(__file__).resolve().parents[1]
IDS = (
    1,
    2,
    3,
    7,
    2**31 - 1,
)  # few values, so ids repeat within a row (non-connected) and across rows (shared)
SHAPES = ("rect", "hline", "vline", "pixel", "speckle")


def assert_same_maps(labels: np.ndarray, sigma: float = 2.0) -> None:
    center, boundary = compute_maps(labels, sigma)
    expected_center, expected_boundary = reference_maps(labels, sigma)
    assert center.dtype == np.float32 and boundary.dtype == np.uint8
    np.testing.assert_array_equal(boundary, expected_boundary)
    np.testing.assert_allclose(center, expected_center, rtol=0, atol=1e-6)


def centres_of(labels: np.ndarray) -> set[tuple[int, int]]:
    return {(int(r), int(c)) for r, c in zip(*center_pixels(labels), strict=True)}


# ------------------------------------------------------------------------------------- hand-checked cases
def test_single_pixel_instance_gives_a_cross_and_a_unit_peak() -> None:
    labels = np.zeros((4, 5, 5), np.int32)
    labels[2, 2, 2] = 9
    center, boundary = compute_maps(labels, 1.0)
    cross = np.zeros((5, 5), np.uint8)
    cross[1:4, 2] = cross[2, 1:4] = 1
    np.testing.assert_array_equal(boundary, cross)
    assert center[2, 2] == 1.0 and center.max() == 1.0 and center.min() > 0


def test_instance_pixels_on_the_image_edge_are_boundary() -> None:
    labels = np.zeros((4, 4, 6), np.int32)
    labels[0] = 1  # one instance covering the whole image
    _, boundary = compute_maps(labels, 1.0)
    frame = np.ones((4, 6), np.uint8)
    frame[1:-1, 1:-1] = 0
    np.testing.assert_array_equal(boundary, frame)


def test_touching_instances_of_one_class_keep_their_seam() -> None:
    labels = np.zeros((4, 6, 10), np.int32)
    labels[0, 1:5, 1:5], labels[0, 1:5, 5:9] = 1, 2
    _, boundary = compute_maps(labels, 1.0)
    assert boundary[2:4, 4:6].all(), "both sides of the seam between touching cells are boundary"
    assert not boundary[2:4, 2:4].any() and not boundary[2:4, 6:8].any()
    assert centres_of(labels) == {(2, 2), (2, 6)}


def test_same_id_in_two_classes_is_two_overlapping_instances() -> None:
    labels = np.zeros((4, 12, 12), np.int32)
    labels[0, 0:8, 0:8] = 7
    labels[3, 4:12, 4:12] = 7
    _, boundary = compute_maps(labels, 1.0)
    assert centres_of(labels) == {(3, 3), (7, 7)}
    assert boundary[7, 5] and boundary[5, 7], "class-1 edge inside the class-4 instance"
    assert boundary[4, 9] and boundary[9, 4], "class-4 edge outside the class-1 instance"
    assert not boundary[2, 2] and not boundary[9, 9]


def test_centre_is_the_truncated_centre_of_mass_even_off_a_non_connected_instance() -> None:
    labels = np.zeros((4, 3, 5), np.int32)
    labels[0, 0, 0] = labels[0, 0, 3] = 4  # centre of mass (0, 1.5): a pixel outside the instance
    labels[1, 0, 0] = labels[1, 0, 1] = labels[1, 1, 0] = 4  # (1/3, 1/3)
    labels[2, 2, 4] = labels[2, 1, 4] = 5  # (1.5, 4)
    assert centres_of(labels) == {(0, 1), (0, 0), (1, 4)}
    assert_same_maps(labels)


def test_no_instances_gives_all_zeros() -> None:
    center, boundary = compute_maps(np.zeros((4, 7, 3), np.int32), 5.0)
    assert center.shape == boundary.shape == (7, 3)
    assert not center.any() and not boundary.any()


def test_rejects_labels_that_are_not_integer_rows() -> None:
    with pytest.raises(ValueError, match="integer array"):
        compute_maps(np.zeros((4, 5, 5), np.float32), 1.0)


# ---------------------------------------------------------------------------- fast == reference, randomly
@st.composite
def label_maps(draw: st.DrawFn) -> np.ndarray:
    """4×H×W label rows painted with rectangles, 1-px lines, single pixels and speckles of a few ids.

    Shapes painted later overwrite earlier ones in the same row (touching and cut instances), a reused id in
    a row is non-connected, a reused id in another row is a shared id, rows overlap freely, shapes reach the
    image edge, and zero shapes give an empty image.
    """
    height, width = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    labels = np.zeros((4, height, width), np.int32)
    for _ in range(draw(st.integers(0, 12))):
        row, instance_id, shape = (
            draw(st.integers(0, 3)),
            draw(st.sampled_from(IDS)),
            draw(st.sampled_from(SHAPES)),
        )
        y0, x0 = draw(st.integers(0, height - 1)), draw(st.integers(0, width - 1))
        y1 = y0 + 1 if shape in ("hline", "pixel") else draw(st.integers(y0 + 1, height))
        x1 = x0 + 1 if shape in ("vline", "pixel") else draw(st.integers(x0 + 1, width))
        region = labels[row, y0:y1, x0:x1]
        if shape == "speckle":
            rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
            region[rng.random(region.shape) < 0.3] = instance_id
        else:
            region[...] = instance_id
    return labels


@settings(max_examples=200, deadline=None)
@given(labels=label_maps(), sigma=st.sampled_from([0.7, 2.0, 5.0]))
def test_fast_maps_equal_the_reference_on_random_label_maps(labels: np.ndarray, sigma: float) -> None:
    assert_same_maps(labels, sigma)


def test_fast_maps_equal_the_reference_on_the_real_sample(real_fixture: Path) -> None:
    _, labels = read_train_sample(list_train_samples(real_fixture, 4)[0])
    assert len(centres_of(labels)) > 100  # dense: 161 instances, some sharing a centre pixel is allowed
    assert_same_maps(labels, sigma=5.0)


# ------------------------------------------------------------------------------------------- the stage
def make_prepared(root: Path) -> dict[str, np.ndarray]:
    """train/{a,b,c}.npz and val/d.npz; ``c`` has no instance. Returns the labels by sample name."""
    rng = np.random.default_rng(0)
    samples = {}
    for split, name in (("train", "b"), ("train", "a"), ("train", "c"), ("val", "d")):
        labels = np.zeros((4, 20, 24), np.int32)
        if name != "c":
            labels[0, 2:8, 2:9], labels[0, 2:8, 9:15], labels[2, 5:16, 10:20] = 1, 2, 1
        (root / split).mkdir(parents=True, exist_ok=True)
        save_train_npz(root / split / f"{name}.npz", rng.integers(0, 256, (20, 24, 3), np.uint8), labels)
        samples[name] = labels
    return samples


def test_write_maps_writes_every_sample_and_the_first_previews(tmp_path: Path) -> None:
    samples = make_prepared(tmp_path / "prepared")
    count = write_maps(
        tmp_path / "prepared", tmp_path / "maps", tmp_path / "plots", MapsParams(3.0, n_previews=2)
    )
    assert count == 4
    written = sorted(p.relative_to(tmp_path / "maps").as_posix() for p in (tmp_path / "maps").rglob("*.npz"))
    assert written == ["train/a.npz", "train/b.npz", "train/c.npz", "val/d.npz"]
    for path in (tmp_path / "maps").rglob("*.npz"):
        maps = load_npz(path)
        assert set(maps) == {"center", "boundary"}
        assert maps["center"].dtype == np.float32 and maps["boundary"].dtype == np.uint8
        assert maps["center"].shape == maps["boundary"].shape == (20, 24)
        assert 0.0 <= maps["center"].min() and maps["center"].max() <= 1.0
        assert set(np.unique(maps["boundary"])) <= {0, 1}
        expected_center, expected_boundary = compute_maps(samples[path.stem], 3.0)
        np.testing.assert_array_equal(maps["center"], expected_center)
        np.testing.assert_array_equal(maps["boundary"], expected_boundary)
    assert load_npz(tmp_path / "maps" / "train" / "a.npz")["center"].max() == 1.0
    assert not load_npz(tmp_path / "maps" / "train" / "c.npz")["center"].any()
    previews = sorted((tmp_path / "plots").iterdir())
    assert [p.name for p in previews] == ["a.png", "b.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in previews)


def test_a_corrupt_sample_names_the_file_and_leaves_the_old_outputs(tmp_path: Path) -> None:
    make_prepared(tmp_path / "prepared")
    bad = tmp_path / "prepared" / "val" / "e.npz"
    bad.write_bytes(b"not an npz")
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "old.png").write_bytes(b"old")
    with pytest.raises(DataFormatError, match=re.escape(str(bad))):
        write_maps(
            tmp_path / "prepared", tmp_path / "maps", tmp_path / "plots", MapsParams(3.0, n_previews=2)
        )
    assert not (tmp_path / "maps").exists()
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["old.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots", "prepared"], "no temporary dir left behind"


def test_a_sample_without_labels_is_named(tmp_path: Path) -> None:
    make_prepared(tmp_path / "prepared")
    bad = tmp_path / "prepared" / "train" / "0.npz"
    np.savez(bad, image=np.zeros((20, 24, 3), np.uint8))
    with pytest.raises(DataFormatError, match=re.escape(f"{bad}: missing array(s) labels")):
        write_maps(
            tmp_path / "prepared", tmp_path / "maps", tmp_path / "plots", MapsParams(3.0, n_previews=0)
        )
    assert not (tmp_path / "maps").exists() and not (tmp_path / "plots").exists()


def test_a_prepared_dir_without_val_is_named(tmp_path: Path) -> None:
    (tmp_path / "prepared" / "train").mkdir(parents=True)
    with pytest.raises(DataFormatError, match=re.escape(f"{tmp_path / 'prepared' / 'val'}: missing folder")):
        write_maps(
            tmp_path / "prepared", tmp_path / "maps", tmp_path / "plots", MapsParams(3.0, n_previews=0)
        )


def test_stage_script_reads_params_yaml_and_writes_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_prepared(tmp_path / "prepared")
    spec = importlib.util.spec_from_file_location("stage_maps", ROOT / "stages" / "maps.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    monkeypatch.chdir(ROOT)  # the stage reads ./params.yaml, as under dvc
    stage.main([str(tmp_path / "prepared"), str(tmp_path / "maps"), str(tmp_path / "plots")])
    assert len(list((tmp_path / "maps").rglob("*.npz"))) == 4
    assert len(list((tmp_path / "plots").glob("*.png"))) >= 1
