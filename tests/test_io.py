"""The raw-format reader: every quirk of the real files and every error case, on real tif files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellseg.data.io import (
    DataFormatError,
    DataWarning,
    list_test_images,
    list_train_samples,
    load_npz,
    read_image,
    read_label,
    read_test_mapping,
    read_train_sample,
    save_train_npz,
    to_label_image,
    to_rgb8,
    write_image_tif,
    write_label_tif,
)
from conftest import disk_labels, make_raw_dataset, write_raw_train_sample


# ------------------------------------------------------------------------------------------ the real sample
def test_real_image_is_rgba_lzw_and_reads_as_rgb(real_fixture: Path) -> None:
    path = real_fixture / "train" / "sample-image" / "image.tif"
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.compression == 5  # LZW: needs imagecodecs
        assert page.shape == (397, 482, 4)
    raw = tifffile.imread(path)
    image = read_image(path)
    assert image.shape == (397, 482, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, raw[..., :3])


def test_real_masks_share_one_id_counter_and_absent_classes_are_empty(real_fixture: Path) -> None:
    (sample,) = list_train_samples(real_fixture, 4)
    assert sample.class_paths[2] is None and sample.class_paths[3] is None
    assert tifffile.imread(sample.class_paths[0]).dtype == np.float64
    image, labels = read_train_sample(sample)
    assert labels.shape == (4, 397, 482) and labels.dtype == np.int32
    ids = [set(np.unique(row).tolist()) - {0} for row in labels]
    assert ids[0] == {1, 2}  # class1: ids 1-2
    assert ids[1] == set(range(3, 162))  # class2: ids 3-161, the counter continues across files
    assert ids[2] == ids[3] == set()
    # lossless: every id equals the float value of the tif
    np.testing.assert_array_equal(labels[1], tifffile.imread(sample.class_paths[1]).astype(np.int32))


def test_real_test_mapping(real_fixture: Path) -> None:
    entries = read_test_mapping(real_fixture / "test_image_name_to_ids.json")
    assert len(entries) == 101
    assert entries[0].file_name.endswith(".tif") and entries[0].image_id == 1
    assert (entries[0].height, entries[0].width) == (446, 512)
    assert sorted(e.image_id for e in entries) == list(range(1, 102))


# ---------------------------------------------------------------------------------------- image conversions
def test_grayscale_16bit_and_planar_images_become_rgb8(tmp_path: Path) -> None:
    gray16 = np.array([[0, 65535], [32768, 257]], np.uint16)
    tifffile.imwrite(tmp_path / "g16.tif", gray16)
    rgb = read_image(tmp_path / "g16.tif")
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[..., 0], [[0, 255], [128, 1]])
    assert (rgb[..., 0] == rgb[..., 2]).all()
    planar = np.stack([np.full((5, 6), v, np.uint8) for v in (10, 20, 30)])  # C×H×W
    np.testing.assert_array_equal(to_rgb8(planar)[0, 0], [10, 20, 30])
    np.testing.assert_array_equal(to_rgb8(np.ones((3, 4), np.float32))[0, 0], [255, 255, 255])


def test_our_writer_reproduces_the_real_quirks(tmp_path: Path) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    write_image_tif(tmp_path / "image.tif", rgb)
    write_label_tif(tmp_path / "class1.tif", np.eye(20, 30) * 7)
    with tifffile.TiffFile(tmp_path / "image.tif") as tif:
        assert tif.pages[0].compression == 5 and tif.pages[0].shape == (20, 30, 4)
    assert tifffile.imread(tmp_path / "class1.tif").dtype == np.float64
    np.testing.assert_array_equal(read_image(tmp_path / "image.tif"), rgb)


# --------------------------------------------------------------------------------------------- error cases
def test_corrupt_tif_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "image.tif"
    bad.write_bytes(b"II*\x00garbage-not-a-tif" * 3)
    with pytest.raises(DataFormatError, match=r"image\.tif: cannot read as tif"):
        read_image(bad)


def test_truncated_tif_names_the_file(tmp_path: Path) -> None:
    write_image_tif(tmp_path / "image.tif", np.zeros((64, 64, 3), np.uint8))
    data = (tmp_path / "image.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 3])
    with pytest.raises(DataFormatError, match=r"cut\.tif"):
        read_image(tmp_path / "cut.tif")


def test_mask_shape_must_match_image(tmp_path: Path) -> None:
    write_label_tif(tmp_path / "class1.tif", np.zeros((10, 12)))
    with pytest.raises(
        DataFormatError, match=r"class1\.tif: mask shape 10×12 differs from the image's 10×13"
    ):
        read_label(tmp_path / "class1.tif", (10, 13))


@pytest.mark.parametrize(
    ("value", "message"),
    [(2.5, "non-integral label value"), (-3.0, "negative label value"), (np.nan, "non-finite")],
)
def test_bad_label_values_are_errors_not_rounded(tmp_path: Path, value: float, message: str) -> None:
    labels = np.zeros((8, 8))
    labels[2, 3] = value
    write_label_tif(tmp_path / "class2.tif", labels)
    with pytest.raises(DataFormatError, match=rf"class2\.tif: .*{message}"):
        read_label(tmp_path / "class2.tif", (8, 8))


def test_label_image_must_be_2d() -> None:
    with pytest.raises(DataFormatError, match="must be 2-D"):
        to_label_image(np.zeros((3, 4, 5)), "x.tif")


def test_train_folder_without_image(tmp_path: Path) -> None:
    make_raw_dataset(tmp_path)
    (tmp_path / "train" / "sample-01" / "image.tif").unlink()
    with pytest.raises(DataFormatError, match=r"sample-01: train folder without image\.tif"):
        list_train_samples(tmp_path, 4)


def test_no_samples_and_no_train_folder(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="train: missing folder"):
        list_train_samples(tmp_path, 4)
    (tmp_path / "train").mkdir()
    with pytest.raises(DataFormatError, match="train: no samples"):
        list_train_samples(tmp_path, 4)


def test_test_image_missing_from_mapping_and_vice_versa(tmp_path: Path) -> None:
    root = make_raw_dataset(tmp_path, n_test=2)
    assert [e.image_id for e, _ in list_test_images(root)] == [1, 2]
    write_image_tif(root / "test_release" / "extra.tif", np.zeros((5, 5, 3), np.uint8))
    with pytest.raises(DataFormatError, match=r"have no entry, e\.g\. \['extra\.tif'\]"):
        list_test_images(root)
    (root / "test_release" / "extra.tif").unlink()
    (root / "test_release" / "test-00.tif").unlink()
    with pytest.raises(DataFormatError, match=r"missing, e\.g\. \['test-00\.tif'\]"):
        list_test_images(root)


def test_mapping_errors(tmp_path: Path) -> None:
    path = tmp_path / "map.json"
    path.write_text("[{")
    with pytest.raises(DataFormatError, match="map.json: invalid JSON"):
        read_test_mapping(path)
    path.write_text(json.dumps([{"file_name": "a.tif", "id": 1}]))
    with pytest.raises(DataFormatError, match="entry 0 needs file_name, id, height and width"):
        read_test_mapping(path)
    row = {"file_name": "a.tif", "id": 1, "height": 3, "width": 3}
    path.write_text(json.dumps([row, {**row, "file_name": "b.tif"}]))
    with pytest.raises(DataFormatError, match=r"duplicate image_id values \[1\]"):
        read_test_mapping(path)


def test_dataset_without_test_side_is_allowed_but_half_a_test_side_is_not(tmp_path: Path) -> None:
    write_raw_train_sample(tmp_path / "train" / "s", np.zeros((8, 8, 3), np.uint8), {})
    assert list_test_images(tmp_path) == []
    (tmp_path / "test_image_name_to_ids.json").write_text("[]")
    with pytest.raises(DataFormatError, match="test_release: missing folder"):
        list_test_images(tmp_path)


# ------------------------------------------------------------------------------------------------- npz
def test_npz_round_trip_and_missing_npz(tmp_path: Path) -> None:
    labels = np.stack([disk_labels((16, 16), [(8, 8)], 3, first_id=k + 1).astype(np.int32) for k in range(4)])
    save_train_npz(tmp_path / "s.npz", np.zeros((16, 16, 3), np.uint8), labels)
    arrays = load_npz(tmp_path / "s.npz")
    np.testing.assert_array_equal(arrays["labels"], labels)
    assert arrays["labels"].dtype == np.int32
    with pytest.raises(DataFormatError, match="nope.npz: file not found"):
        load_npz(tmp_path / "nope.npz")


# ------------------------------------------------------------------------------------ bad input (issue 13)
def test_12bit_data_in_a_16bit_tif_keeps_its_contrast(tmp_path: Path) -> None:
    """Microscope cameras store 12-bit data in 16-bit tifs: its maximum 4095 must come out white, not 16."""
    gray12 = np.array([[0, 4095], [2048, 1000]], np.uint16)
    tifffile.imwrite(tmp_path / "g12.tif", gray12)
    rgb = read_image(tmp_path / "g12.tif")
    np.testing.assert_array_equal(rgb[..., 0], np.round(gray12 * (255 / 4095)).astype(np.uint8))
    assert rgb.max() == 255
    gray10 = np.array([[0, 1023]], np.uint16)  # 10-bit data: the smallest depth that holds the maximum
    np.testing.assert_array_equal(to_rgb8(gray10)[..., 0], [[0, 255]])
    # 8-bit values stored as 16 bits are left as they are
    np.testing.assert_array_equal(to_rgb8(np.array([[0, 7, 200]], np.uint16))[..., 0], [[0, 7, 200]])


def test_multi_page_tif_is_an_error_not_a_planar_rgb_image(tmp_path: Path) -> None:
    pages = np.stack([np.full((6, 7), v, np.uint8) for v in (10, 20, 30)])
    tifffile.imwrite(tmp_path / "stack.tif", pages, photometric="minisblack")  # 3 pages of 6×7
    with pytest.raises(DataFormatError, match=r"stack\.tif: 3 pages; expected a single-page tif"):
        read_image(tmp_path / "stack.tif")
    tifffile.imwrite(tmp_path / "mask.tif", pages[:2].astype(np.float64), photometric="minisblack")
    with pytest.raises(DataFormatError, match=r"mask\.tif: 2 pages"):
        read_label(tmp_path / "mask.tif", (6, 7))


def test_cmyk_tif_is_an_error_not_rgba(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "cmyk.tif", np.zeros((6, 7, 4), np.uint8), photometric="separated")
    with pytest.raises(DataFormatError, match=r"cmyk\.tif: colour model SEPARATED is not supported"):
        read_image(tmp_path / "cmyk.tif")


def test_planar_rgb_tif_still_reads(tmp_path: Path) -> None:
    planar = np.stack([np.full((5, 6), v, np.uint8) for v in (10, 20, 30)])
    tifffile.imwrite(tmp_path / "p.tif", planar, photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(read_image(tmp_path / "p.tif")[2, 3], [10, 20, 30])


def test_float32_ids_above_2_24_are_an_error(tmp_path: Path) -> None:
    """float32 cannot hold every id above 2**24: 16777217 is written as 16777216, merging two cells."""
    labels = np.zeros((4, 4), np.float32)
    labels[0, 0], labels[1, 1] = 2**24 + 2, 3
    tifffile.imwrite(tmp_path / "class1.tif", labels)
    with pytest.raises(DataFormatError, match=r"class1\.tif: label value 16777218 above 16777216"):
        read_label(tmp_path / "class1.tif", (4, 4))
    labels[0, 0] = 2**24  # the largest id float32 holds exactly (with all below it) is accepted
    tifffile.imwrite(tmp_path / "class1.tif", labels)
    assert read_label(tmp_path / "class1.tif", (4, 4)).max() == 2**24


@pytest.mark.parametrize("name", ["Class1.tif", "class1.tiff", "class0.tif", "CLASS2.TIF", "image.tiff"])
def test_misnamed_class_or_image_file_is_an_error(tmp_path: Path, name: str) -> None:
    folder = tmp_path / "train" / "s"
    write_raw_train_sample(folder, np.zeros((8, 8, 3), np.uint8), {})
    write_label_tif(folder / name, disk_labels((8, 8), [(4, 4)], 2, first_id=1))
    with pytest.raises(DataFormatError, match=rf"s/{name}: unexpected file name; a sample holds exactly"):
        list_train_samples(tmp_path, 4)


def test_a_class_file_beyond_the_classes_is_an_error_naming_it(tmp_path: Path) -> None:
    """class<k>.tif holds the k-th name of `classes`: a file past the last name would train as background."""
    folder = tmp_path / "train" / "s"
    write_raw_train_sample(folder, np.zeros((8, 8, 3), np.uint8), {1: disk_labels((8, 8), [(4, 4)], 2, 1)})
    write_label_tif(folder / "class5.tif", disk_labels((8, 8), [(2, 2)], 1, first_id=2))
    with pytest.raises(
        DataFormatError, match=r"s/class5\.tif: class 5, but `classes` in params.yaml has 4 name"
    ):
        list_train_samples(tmp_path, 4)
    (sample,) = list_train_samples(tmp_path, 6)  # six classes: class5.tif is the fifth, class6.tif absent
    assert [p is None for p in sample.class_paths] == [False, True, True, True, False, True]
    image, labels = read_train_sample(sample)
    assert labels.shape == (6, 8, 8) and labels[4].max() == 2 and labels[0].max() == 1


def test_other_unexpected_files_in_a_sample_warn(tmp_path: Path) -> None:
    folder = tmp_path / "train" / "s"
    write_raw_train_sample(folder, np.zeros((8, 8, 3), np.uint8), {})
    (folder / "notes.txt").write_text("scanned 2024")
    (folder / ".DS_Store").write_bytes(b"")
    with pytest.warns(
        DataWarning, match=r"s/notes\.txt: unexpected file in a sample folder, ignored"
    ) as record:
        (sample,) = list_train_samples(tmp_path, 4)
    assert len(record) == 1 and sample.name == "s"


def test_two_test_images_with_the_same_stem_are_an_error(tmp_path: Path) -> None:
    root = make_raw_dataset(tmp_path, n_test=1)
    write_image_tif(root / "test_release" / "test-00.tiff", np.zeros((48, 64, 3), np.uint8))
    mapping = json.loads((root / "test_image_name_to_ids.json").read_text())
    mapping.append({"file_name": "test-00.tiff", "id": 9, "height": 48, "width": 64})
    (root / "test_image_name_to_ids.json").write_text(json.dumps(mapping))
    with pytest.raises(DataFormatError, match=r"test-00\.tif and test-00\.tiff have the same stem"):
        list_test_images(root)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", 1.9),
        ("id", "7"),
        ("id", True),
        ("id", 0),
        ("id", -3),
        ("id", 2**63),
        ("height", 0),
        ("width", 12.0),
        ("file_name", None),
        ("file_name", 5),
        ("file_name", "sub/a.tif"),
    ],
)
def test_mapping_values_are_checked_not_coerced(tmp_path: Path, field: str, value: object) -> None:
    path = tmp_path / "map.json"
    path.write_text(json.dumps([{"file_name": "a.tif", "id": 1, "height": 3, "width": 3, field: value}]))
    with pytest.raises(DataFormatError, match=rf"map\.json: entry 0.*{field} must be"):
        read_test_mapping(path)
