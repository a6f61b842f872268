"""The training Dataset: joint augmentation of image, instances and maps, crops, reproducibility, targets."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cellseg.data.dataset import CellDataset, build_augmentation, collate, instance_targets, npz_memmaps
from cellseg.data.io import DataFormatError, save_train_npz
from cellseg.fsutil import save_npz
from cellseg.params import load_params
from conftest import ROOT

AUGMENT = load_params(ROOT / "params.yaml").augment


def _labels(h: int = 64, w: int = 80) -> np.ndarray:
    """Touching squares with large ids (beyond uint16) in two classes, one id shared by both classes."""
    labels = np.zeros((4, h, w), np.int32)
    labels[0, 10:30, 10:30] = 70_001
    labels[0, 10:30, 30:50] = 70_002  # touches 70_001
    labels[1, 35:60, 20:45] = 70_001  # same id, other class: another instance
    labels[3, 0:6, 70:80] = 5  # on the image edge
    return labels


def _dataset(tmp_path: Path, n: int = 3, **kwargs) -> CellDataset:
    rng = np.random.default_rng(0)
    for i in range(n):
        labels = _labels()
        image = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
        save_train_npz(tmp_path / "prepared" / f"s{i}.npz", image, labels)
        center = rng.random((64, 80)).astype(np.float32)
        save_npz(tmp_path / "maps" / f"s{i}.npz", center=center, boundary=(center > 0.5).astype(np.uint8))
    return CellDataset(tmp_path / "prepared", tmp_path / "maps", **kwargs)


def test_no_normalisation_in_the_data_pipeline(tmp_path: Path) -> None:
    """The model normalises inside (GeneralizedRCNNTransform); the data must stay in [0, 1], unnormalised."""
    augmentation = build_augmentation(AUGMENT)
    assert not any(isinstance(t, A.Normalize) for t in augmentation.transforms)
    image, _ = _dataset(tmp_path)[0]
    assert image.dtype == torch.float32 and 0.0 <= image.min() and image.max() <= 1.0 and image.max() > 0.9


def test_defaults_are_the_reference_augmentation() -> None:
    (elastic,) = build_augmentation(AUGMENT).transforms
    assert isinstance(elastic, A.ElasticTransform)
    assert (elastic.alpha, elastic.sigma, elastic.p) == (30.0, 12.0, 0.3)
    params = load_params(ROOT / "params.yaml", overrides={"augment.elastic_p": 0.0})
    assert build_augmentation(params.augment) is None
    flips = load_params(ROOT / "params.yaml", overrides={"augment.hflip_p": 0.5, "augment.rotate90_p": 0.5})
    kinds = [type(t) for t in build_augmentation(flips.augment).transforms]
    assert kinds == [A.HorizontalFlip, A.RandomRotate90, A.ElasticTransform]


def test_stain_jitter_changes_the_image_colours_only(tmp_path: Path) -> None:
    """HEStain recolours the image; instance masks and both maps stay exactly as they were."""
    params = load_params(ROOT / "params.yaml", overrides={"augment.stain_p": 1.0, "augment.elastic_p": 0.0})
    augmentation = build_augmentation(params.augment)
    assert [type(t) for t in augmentation.transforms] == [A.HEStain]
    plain, stained = _dataset(tmp_path), _dataset(tmp_path, augment=augmentation)
    (image, target), (image_s, target_s) = plain[0], stained[0]
    assert image_s.shape == image.shape and (image_s - image).abs().mean() > 0.005  # colours did move
    for key in ("masks", "boxes", "labels", "center", "boundary"):
        torch.testing.assert_close(target_s[key], target[key])


def test_colour_blur_and_compression_change_the_image_only(tmp_path: Path) -> None:
    """Another scanner's colours, focus and JPEG: the image moves, instances and maps do not."""
    overrides = {
        "augment.color_p": 1.0,
        "augment.blur_p": 1.0,
        "augment.jpeg_p": 1.0,
        "augment.elastic_p": 0.0,
    }
    augmentation = build_augmentation(load_params(ROOT / "params.yaml", overrides=overrides).augment)
    assert [type(t) for t in augmentation.transforms] == [A.ColorJitter, A.GaussianBlur, A.ImageCompression]
    (image, target), (image_a, target_a) = _dataset(tmp_path)[0], _dataset(tmp_path, augment=augmentation)[0]
    assert (image_a - image).abs().mean() > 0.01
    for key in ("masks", "boxes", "labels", "center", "boundary"):
        torch.testing.assert_close(target_a[key], target[key])


def test_scale_jitter_zooms_image_instances_and_maps_together(tmp_path: Path) -> None:
    """A zoom of exactly 2: every instance mask is its original with each pixel doubled (nearest neighbour, ids
    intact), the maps double in size with the image; with crops, a half-size window comes back at crop size."""
    (_, target), (image_z, target_z) = (
        _dataset(tmp_path)[0],
        _dataset(tmp_path, scale_p=1.0, scale_range=(2.0, 2.0))[0],
    )
    assert image_z.shape == (3, 128, 160) and target_z["center"].shape == (128, 160)
    doubled = {tuple(np.kron(m.numpy(), np.ones((2, 2), np.uint8)).ravel()) for m in target["masks"]}
    assert {tuple(m.numpy().ravel()) for m in target_z["masks"]} == doubled
    torch.testing.assert_close(target_z["labels"], target["labels"])
    cropped, _ = _dataset(tmp_path, crop_size=32, scale_p=1.0, scale_range=(2.0, 2.0))[1]
    assert cropped.shape == (3, 32, 32)
    shrunk, _ = _dataset(tmp_path, crop_size=32, scale_p=1.0, scale_range=(0.5, 0.5))[1]
    assert shrunk.shape == (3, 32, 32)  # a 64-px window, halved


def test_warping_the_label_rows_equals_warping_each_instance_mask() -> None:
    """One nearest-neighbour warp of the label rows gives exactly the per-instance warped masks."""
    labels = _labels()
    image = np.zeros((64, 80, 3), np.uint8)
    warp = A.Compose([A.ElasticTransform(alpha=30, sigma=12, p=1.0)])
    warp.set_random_seed(7)
    rows = warp(image=image, mask=np.ascontiguousarray(labels.transpose(1, 2, 0)))["mask"].transpose(2, 0, 1)
    assert rows.dtype == np.int32 and set(np.unique(rows)) <= set(np.unique(labels))  # large ids survive
    for k, instance_id in [(0, 70_001), (0, 70_002), (1, 70_001), (3, 5)]:
        warp.set_random_seed(7)
        mask = warp(image=image, mask=(labels[k] == instance_id).astype(np.uint8))["mask"]
        np.testing.assert_array_equal(rows[k] == instance_id, mask.astype(bool))
    assert not np.array_equal(rows, labels)  # the warp did move pixels


def test_image_masks_and_maps_move_together(tmp_path: Path) -> None:
    """With a horizontal flip forced, every target is flipped with the image."""
    params = load_params(ROOT / "params.yaml", overrides={"augment.hflip_p": 1.0, "augment.elastic_p": 0.0})
    plain, flipped = _dataset(tmp_path), _dataset(tmp_path, augment=build_augmentation(params.augment))
    (image, target), (image_f, target_f) = plain[0], flipped[0]
    torch.testing.assert_close(image_f, image.flip(-1))
    torch.testing.assert_close(target_f["center"], target["center"].flip(-1))
    torch.testing.assert_close(target_f["boundary"], target["boundary"].flip(-1))
    flipped_masks = {tuple(m.flip(-1).flatten().tolist()) for m in target["masks"]}
    assert {tuple(m.flatten().tolist()) for m in target_f["masks"]} == flipped_masks


def test_targets_keep_touching_instances_apart_and_handle_empty_images() -> None:
    target = instance_targets(_labels())
    assert target["labels"].tolist() == [1, 1, 2, 4]
    assert target["masks"].shape == (4, 64, 80) and target["masks"].dtype == torch.uint8
    assert target["boxes"].tolist()[:2] == [[10, 10, 30, 30], [30, 10, 50, 30]]  # exclusive right/bottom
    empty = instance_targets(np.zeros((4, 20, 30), np.int32))
    assert (
        empty["boxes"].shape == (0, 4)
        and empty["masks"].shape == (0, 20, 30)
        and empty["labels"].numel() == 0
    )


def test_crops_bound_the_size_and_cut_instances_consistently(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path, crop_size=32)
    for i in range(len(dataset)):
        image, target = dataset[i]
        assert image.shape == (3, 32, 32) and target["center"].shape == (32, 32)
        assert target["masks"].shape[1:] == (32, 32)
        assert all(m.any() for m in target["masks"])  # instances cropped away are dropped, not kept empty


def test_items_are_reproducible_and_independent_of_workers(tmp_path: Path) -> None:
    augmentation = build_augmentation(
        load_params(ROOT / "params.yaml", overrides={"augment.elastic_p": 1.0}).augment
    )
    dataset = _dataset(tmp_path, crop_size=48, augment=augmentation, seed=3)
    first = [dataset[i] for i in range(len(dataset))]
    again = [dataset[i] for i in range(len(dataset))]
    for (a, ta), (b, tb) in zip(first, again, strict=True):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(ta["masks"], tb["masks"])
    dataset.set_epoch(1)
    assert not torch.equal(dataset[0][0], first[0][0])  # another epoch, other crops and warps
    dataset.set_epoch(0)
    loaded = [
        item
        for batch in DataLoader(dataset, batch_size=1, num_workers=2, collate_fn=collate)
        for item in zip(*batch, strict=True)
    ]
    for (a, ta), (b, tb) in zip(first, loaded, strict=True):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(ta["boxes"], tb["boxes"])


def test_missing_maps_name_the_file(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path)
    (tmp_path / "maps" / "s1.npz").unlink()
    with pytest.raises(DataFormatError, match=r"s1\.npz: file not found"):
        dataset[1]


def test_ids_near_the_int32_limit_and_rows_without_background() -> None:
    """Instance splitting must not allocate per possible id (find_objects does), nor lose an id that covers a row."""
    labels = np.zeros((4, 20, 20), np.int32)
    labels[0, 2:5, 2:5] = 2_000_000_000
    labels[0, 6:9, 6:9] = 7
    labels[1] = 2_000_000_000  # fills the whole row: no background pixel
    labels[1, 1:3, 1:3] = 2_000_000_001
    target = instance_targets(labels)
    assert target["labels"].tolist() == [1, 1, 2, 2]
    assert sorted(int(m.sum()) for m in target["masks"]) == [4, 9, 9, 396]


def test_samples_are_read_through_memory_maps(tmp_path: Path) -> None:
    arrays = {
        "image": np.arange(40 * 50 * 3, dtype=np.uint8).reshape(40, 50, 3),
        "labels": np.arange(4 * 40 * 50, dtype=np.int32).reshape(4, 40, 50),
        "fortran": np.asfortranarray(np.arange(35, dtype=np.float32).reshape(5, 7)),
    }
    np.savez(tmp_path / "stored.npz", **arrays)  # how the prepare and maps stages write
    mapped = npz_memmaps(tmp_path / "stored.npz")
    assert set(mapped) == set(arrays)
    for key, value in arrays.items():
        assert isinstance(mapped[key], np.memmap) and np.array_equal(mapped[key], value), key
    np.savez_compressed(tmp_path / "compressed.npz", **arrays)
    loaded = npz_memmaps(tmp_path / "compressed.npz")
    assert not isinstance(loaded["labels"], np.memmap) and np.array_equal(loaded["labels"], arrays["labels"])
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(DataFormatError, match="broken.npz: cannot read as npz"):
        npz_memmaps(tmp_path / "broken.npz")
