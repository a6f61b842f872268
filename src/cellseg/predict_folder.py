"""Prediction on any folder of images, written the way annotations are: one instance label map per class.

For users without a test mapping. Each image ``<in>/<stem>.tif|png|jpg`` gives ``<out>/<stem>/class1.tif ..
class4.tif``: float64 label images in which each non-zero value is one instance, with one id counter across
the classes of the image (class1 holds the first ids), as in the raw training data. A class without instances
has no file. Predictions therefore open with the same readers and viewers as the annotations.

A label map holds one id per pixel: where instances of one class overlap, the higher-scoring one keeps the
pixel (instances of different classes live in different files and may overlap, as in the annotations).

On request (``maps_format``), a model with auxiliary heads also writes its centre and boundary probabilities
beside the label maps: ``center.png`` and ``boundary.png`` (8-bit, 255 = 1.0) or ``maps.npz`` (float32).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from cellseg import NUM_CLASSES, CellsegError
from cellseg.fsutil import atomic_dir, save_npz
from cellseg.instances import Instances
from cellseg.io import CLASS_FILES, DataFormatError, read_image, to_rgb8, write_label_tif
from cellseg.model import CellMaskRCNN
from cellseg.params import PostprocParams, PredictParams
from cellseg.postproc import ProbMaps
from cellseg.predict import predict_images_maps

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
_PIL_MODES = ("L", "RGB", "RGBA", "I;16")  # modes whose arrays to_rgb8 understands as they are
MAPS_FORMATS = ("png", "npz")


def list_images(folder: str | Path) -> list[Path]:
    """The images of ``folder`` in name order; two files with the same stem would share an output folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataFormatError(f"{folder}: not a folder")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataFormatError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    stems: dict[str, Path] = {}
    for path in paths:
        if path.stem in stems:
            raise DataFormatError(f"{path} and {stems[path.stem]} would both be written to {path.stem}/")
        stems[path.stem] = path
    return paths


def read_any_image(path: Path) -> np.ndarray:
    """``uint8 H×W×3`` from a tif (as the dataset's images are read) or from any format Pillow opens."""
    if path.suffix.lower() in (".tif", ".tiff"):
        return read_image(path)
    try:
        with Image.open(path) as image:
            array = np.asarray(image if image.mode in _PIL_MODES else image.convert("RGB"))
    except OSError as err:
        raise DataFormatError(f"{path}: cannot read as an image ({err})") from err
    return to_rgb8(array, path)


def label_maps(inst: Instances) -> dict[int, np.ndarray]:
    """Per class present, a float64 ``H×W`` label image; ids run across classes, by class then by score."""
    order = np.lexsort((-inst.scores, inst.labels))  # by class, then by decreasing score
    ids = np.empty(len(inst), np.int64)
    ids[order] = np.arange(1, len(inst) + 1)
    maps: dict[int, np.ndarray] = {}
    for i in order[::-1]:  # increasing score within a class: the higher-scoring instance paints last
        (y0, x0), crop = inst.offsets[i], inst.crops[i]
        labels = maps.setdefault(int(inst.labels[i]), np.zeros((inst.height, inst.width), np.float64))
        labels[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]][crop] = ids[i]
    return dict(sorted(maps.items()))


def write_label_maps(
    folder: Path, inst: Instances, maps: ProbMaps | None = None, maps_format: str = "png"
) -> None:
    """``folder/class{k}.tif`` for every class with instances (and ``maps`` when given), atomically (the folder
    appears complete)."""
    with atomic_dir(folder) as tmp:
        for k, labels in label_maps(inst).items():
            write_label_tif(tmp / CLASS_FILES[k - 1], labels)
        if maps is not None:
            write_prob_maps(tmp, maps, maps_format)


def write_prob_maps(folder: Path, maps: ProbMaps, maps_format: str) -> None:
    """``center.png`` and ``boundary.png`` (probability × 255, rounded) or ``maps.npz`` (float32)."""
    if maps_format == "npz":
        save_npz(folder / "maps.npz", center=maps.center, boundary=maps.boundary)
        return
    if maps_format != "png":
        raise ValueError(f"maps_format must be one of {', '.join(MAPS_FORMATS)}; got {maps_format!r}")
    for name, values in (("center", maps.center), ("boundary", maps.boundary)):
        pixels = np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{name}.png")


def _read_all(paths: list[Path]) -> Iterator[np.ndarray]:
    for path in paths:
        yield read_any_image(path)


def predict_folder(
    model: CellMaskRCNN,
    in_dir: str | Path,
    out_dir: str | Path,
    params: PredictParams,
    device: torch.device,
    postproc: PostprocParams | None = None,
    maps_format: str | None = None,
) -> dict:
    """Predict every image of ``in_dir`` into ``out_dir/<stem>/``; return the instance count per image.

    Only the per-image folders are replaced, so other content of ``out_dir`` is left alone. ``postproc`` adds
    the map-guided steps; ``maps_format`` (``png`` or ``npz``) also writes the heads' maps.
    """
    if maps_format is not None and not getattr(model, "has_aux", False):
        raise CellsegError(
            "writing maps needs a model with the auxiliary heads (trained with aux.enabled: true)"
        )
    paths = list_images(in_dir)
    out_dir = Path(out_dir)
    counts = {}
    predictions = predict_images_maps(model, _read_all(paths), params, device, postproc)
    for path, (inst, maps) in tqdm(
        zip(paths, predictions, strict=True), total=len(paths), desc="predict", unit="img"
    ):
        write_label_maps(out_dir / path.stem, inst, maps if maps_format else None, maps_format or "png")
        counts[path.name] = {f"class{k}": int((inst.labels == k).sum()) for k in range(1, NUM_CLASSES + 1)}
    return counts
