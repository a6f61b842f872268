"""Training data: a Dataset over the prepared npz files, joint augmentation, and Mask R-CNN targets.

The image, the label rows (instance ids) and both auxiliary maps go through one albumentations call, so
every geometric change is applied identically to all of them. The label rows are warped with nearest-neighbour
sampling, which is exactly what warping each instance's binary mask would give, at the cost of one image
instead of one per instance; instance masks are split out afterwards, inside the (cropped) window only.

Samples are read through memory maps of the (uncompressed) prepared npz files, so a 256-px crop of a
2500-px image reads the crop's pages, not the whole image, label rows and maps.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from cellseg import MAP_NAMES
from cellseg.data.io import DataFormatError, load_npz, visible_files
from cellseg.instances import Instances
from cellseg.params import AugmentParams


def npz_memmaps(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` as read-only memory maps (members stored uncompressed, as the prepare and
    maps stages write them); an archive with a compressed member is read whole instead."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
        if any(m.compress_type != zipfile.ZIP_STORED for m in members):
            return load_npz(path)
        arrays = {}
        with open(path, "rb") as file:
            for member in members:
                file.seek(member.header_offset + 26)  # the local header's name and extra-field lengths
                name_len, extra_len = struct.unpack("<HH", file.read(4))
                file.seek(member.header_offset + 30 + name_len + extra_len)
                version = np.lib.format.read_magic(file)
                read_header = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape, fortran, dtype = read_header(file)
                if dtype.hasobject:
                    return load_npz(path)
                arrays[member.filename.removesuffix(".npy")] = np.memmap(
                    path, dtype, "r", offset=file.tell(), shape=shape, order="F" if fortran else "C"
                )
        return arrays
    except FileNotFoundError as err:
        raise DataFormatError(f"{path}: file not found") from err
    except (zipfile.BadZipFile, ValueError, struct.error) as err:
        raise DataFormatError(f"{path}: cannot read as npz ({type(err).__name__}: {err})") from err


def build_augmentation(params: AugmentParams) -> A.Compose | None:
    """The reference's ``ElasticTransform`` plus optional flips, 90° rotations, H&E stain jitter, colour jitter,
    blur and JPEG artefacts; ``None`` when all are off. (Scale jitter is the dataset's: :class:`CellDataset`.)

    Stain jitter (albumentations' ``HEStain``: the image is unmixed into haematoxylin and eosin, each stain's
    intensity scaled and shifted, then mixed again) changes colours the way another lab's staining would; colour
    jitter, blur and compression imitate other scanners. These are image-only transforms, so masks and maps are
    untouched.
    """
    strength = params.color_strength
    candidates = [
        (params.hflip_p, lambda p: A.HorizontalFlip(p=p)),
        (params.vflip_p, lambda p: A.VerticalFlip(p=p)),
        (params.rotate90_p, lambda p: A.RandomRotate90(p=p)),
        (
            params.elastic_p,
            lambda p: A.ElasticTransform(alpha=params.elastic_alpha, sigma=params.elastic_sigma, p=p),
        ),
        (
            params.stain_p,
            lambda p: A.HEStain(
                method=params.stain_method,
                intensity_scale_range=(1 - params.stain_scale, 1 + params.stain_scale),
                intensity_shift_range=(-params.stain_shift, params.stain_shift),
                p=p,
            ),
        ),
        (
            params.color_p,
            lambda p: A.ColorJitter(
                brightness=(1 - strength, 1 + strength),
                contrast=(1 - strength, 1 + strength),
                saturation=(1 - strength, 1 + strength),
                hue=(-strength / 4, strength / 4),
                p=p,
            ),
        ),
        (params.blur_p, lambda p: A.GaussianBlur(sigma_limit=(0.5, 1.5), p=p)),
        (params.jpeg_p, lambda p: A.ImageCompression(quality_range=(50, 95), p=p)),
    ]
    transforms = [make(p) for p, make in candidates if p > 0]
    if not transforms:
        return None
    return A.Compose(transforms, additional_targets={"center": "mask", "boundary": "mask"})


def scale_jitter(params: AugmentParams) -> dict:
    """:class:`CellDataset`'s scale-jitter arguments (the range is read only when the jitter is on)."""
    if params.scale_p == 0:
        return {}
    return {"scale_p": params.scale_p, "scale_range": (params.scale_min, params.scale_max)}


def instance_targets(labels: np.ndarray) -> dict[str, torch.Tensor]:
    """Mask R-CNN targets from label rows (``4×H×W``): ``masks`` (N×H×W uint8), ``boxes`` (N×4 xyxy), ``labels``.

    Boxes are the tight pixel boxes with exclusive right/bottom edges, so a one-pixel cell has a box of
    size 1×1 (never degenerate). An image without instances gives empty tensors with the right shapes.
    """
    inst = Instances.from_label_rows(labels)
    return {
        "boxes": torch.from_numpy(inst.boxes_xyxy()).reshape(-1, 4),
        "labels": torch.from_numpy(inst.labels),
        "masks": torch.from_numpy(inst.full_masks().view(np.uint8)),
    }


def random_window(shape: tuple[int, int], size: int, rng: np.random.Generator) -> tuple[slice, slice]:
    """A random ``size × size`` window inside ``shape`` (the whole side where the image is smaller)."""
    slices = []
    for side in shape:
        extent = min(side, size)
        start = int(rng.integers(0, side - extent + 1))
        slices.append(slice(start, start + extent))
    return slices[0], slices[1]


class CellDataset(Dataset):
    """Samples of one split: ``(image float CxHxW in [0,1], target dict)`` for torchvision's Mask R-CNN.

    With ``crop_size`` each item is a random window (memory and time stay bounded on 2500-px images); with
    ``augment`` the window is augmented. Randomness is derived from ``(seed, epoch, index)``, so an epoch
    is reproducible whatever the number of DataLoader workers. ``maps_dir`` adds ``center`` and ``boundary``
    (H×W float) to the target for the auxiliary heads.
    """

    def __init__(
        self,
        prepared_dir: str | Path,
        maps_dir: str | Path | None = None,
        *,
        crop_size: int | None = None,
        augment: A.Compose | None = None,
        seed: int = 0,
        scale_p: float = 0.0,
        scale_range: tuple[float, float] = (1.0, 1.0),
    ) -> None:
        self.files = visible_files(prepared_dir, (".npz",))
        self.maps_dir = Path(maps_dir) if maps_dir is not None else None
        self.crop_size = crop_size
        self.augment = augment
        self.scale_p = scale_p
        self.scale_range = scale_range
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def load(self, index: int) -> dict[str, np.ndarray]:
        """The raw arrays of one sample: ``image``, ``labels`` and, with maps, ``center`` and ``boundary``."""
        path = self.files[index]
        arrays = npz_memmaps(path)
        for key in ("image", "labels"):
            if key not in arrays:
                raise DataFormatError(f"{path}: no '{key}' array (was it written by the prepare stage?)")
        sample = {"image": arrays["image"], "labels": arrays["labels"]}
        if self.maps_dir is not None:
            maps_path = self.maps_dir / path.name
            maps = npz_memmaps(maps_path)
            for key in MAP_NAMES:
                if key not in maps or maps[key].shape != sample["image"].shape[:2]:
                    raise DataFormatError(
                        f"{maps_path}: missing or mis-sized '{key}' map (rerun the maps stage)"
                    )
                sample[key] = maps[key]
        return sample

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        sample = self.load(index)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        zoom = 1.0
        if (
            self.scale_p > 0 and rng.random() < self.scale_p
        ):  # no draw when off: the streams stay as they were
            zoom = float(rng.uniform(*self.scale_range))
        if self.crop_size is not None:
            window = random_window(sample["image"].shape[:2], max(1, round(self.crop_size / zoom)), rng)
            sample = {
                k: v[..., window[0], window[1]] if k == "labels" else v[window] for k, v in sample.items()
            }
        sample = {k: np.array(v) for k, v in sample.items()}  # read the (cropped) pages; no map kept
        if zoom != 1.0:
            sample = zoomed(sample, zoom)
        if self.augment is not None:
            sample = self._augment(sample, int(rng.integers(2**31)))
        image = torch.from_numpy(np.ascontiguousarray(sample["image"].transpose(2, 0, 1))).float().div_(255.0)
        target = instance_targets(sample["labels"])
        for key in MAP_NAMES:
            if key in sample:
                target[key] = torch.from_numpy(np.ascontiguousarray(sample[key], dtype=np.float32))
        return image, target

    def _augment(self, sample: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
        self.augment.set_random_seed(seed)
        inputs = {"image": sample["image"], "mask": np.ascontiguousarray(sample["labels"].transpose(1, 2, 0))}
        inputs.update({k: sample[k] for k in MAP_NAMES if k in sample})
        out = self.augment(**inputs)
        result = {"image": out["image"], "labels": np.ascontiguousarray(out["mask"].transpose(2, 0, 1))}
        result.update({k: out[k] for k in MAP_NAMES if k in sample})
        return result


def zoomed(sample: dict[str, np.ndarray], zoom: float) -> dict[str, np.ndarray]:
    """Scale jitter: every array of the sample resized by ``zoom`` (image and maps smoothly, label rows by
    nearest neighbour, so ids stay ids), as if the tissue had been scanned at another resolution."""
    height, width = sample["image"].shape[:2]
    size = (max(1, round(width * zoom)), max(1, round(height * zoom)))
    smooth = cv2.INTER_AREA if zoom < 1 else cv2.INTER_LINEAR
    out = {}
    for key, value in sample.items():
        if key == "labels":
            rows = [cv2.resize(row, size, interpolation=cv2.INTER_NEAREST) for row in value.astype(np.int32)]
            out[key] = np.stack(rows) if rows else np.zeros((0, size[1], size[0]), np.int32)
        else:
            out[key] = cv2.resize(value, size, interpolation=smooth)
    return out


def collate(batch: list) -> tuple[list, list]:
    """Detection models take lists of differently sized images, not a stacked tensor."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)
