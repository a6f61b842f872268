"""Prediction on any folder of images, written the way annotations are: one instance label map per class.

For users without a test mapping. Each image ``<in>/<stem>.tif|png|jpg`` gives ``<out>/<stem>/class1.tif ..
classK.tif`` (K: the model's classes, ``class<k>.tif`` for its k-th name): float64 label images in which each non-zero value is one instance, with one id counter across
the classes of the image (class1 holds the first ids), as in the raw training data. A class without instances
has no file. Predictions therefore open with the same readers and viewers as the annotations.

The files hold the model's nuclei (:mod:`cellseg.nuclei`: one nucleus per pixel across all classes, the tuned
thresholds), written by the ``tifs`` output format (:mod:`cellseg.outputs.label_tifs`).

On request (``maps_format``), a model with auxiliary heads also writes its centre and boundary probabilities
beside the label maps: ``center.png`` and ``boundary.png`` (8-bit, 255 = 1.0) or ``maps.npz`` (float32).

``<out>/provenance.json`` (:meth:`cellseg.model.bundle.ModelBundle.provenance`, when given) records the model and settings of the latest
run into ``<out>`` and the images it predicted. It is written before the first image folder, so every folder a
run writes is described by it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from cellseg import CellsegError
from cellseg.data.io import DataFormatError, read_image, to_rgb8, visible_files
from cellseg.device import select_device
from cellseg.fsutil import save_npz, write_json
from cellseg.infer.predict import predict_images_maps
from cellseg.infer.prob_maps import ProbMaps
from cellseg.model.bundle import BESIDE, open_model
from cellseg.model.maskrcnn import CellMaskRCNN
from cellseg.nuclei import LabelMap, NucleusRule, label_map
from cellseg.outputs import Nuclei, SinkContext, open_sinks
from cellseg.outputs.base import TempOutput
from cellseg.params import PostprocParams, PredictParams, load_params
from cellseg.provenance import PROVENANCE_FILE

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
_PIL_MODES = ("L", "RGB", "RGBA", "I;16", "I;16L", "I;16B", "I", "F")  # read as arrays, not converted
MAPS_FORMATS = ("png", "npz")


def list_images(folder: str | Path) -> list[Path]:
    """The images of ``folder`` in name order; two files with the same stem would share an output folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataFormatError(f"{folder}: not a folder")
    paths = visible_files(folder, IMAGE_SUFFIXES)
    if not paths:
        raise DataFormatError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    stems: dict[str, Path] = {}
    for path in paths:
        if path.stem in stems:
            raise DataFormatError(f"{path} and {stems[path.stem]} would both be written to {path.stem}/")
        stems[path.stem] = path
    return paths


def read_any_image(path: Path) -> np.ndarray:
    """``uint8 H×W×3`` from a tif (as the dataset's images are read) or from any format Pillow opens.

    The EXIF orientation is applied (a phone or slide-scanner JPEG shows upright, as in a viewer), and
    16-bit, 32-bit integer and float images go through :func:`cellseg.data.io.to_rgb8` (bit-depth scaling, range
    check) instead of Pillow's ``convert("RGB")``, which clips them to 0..255.
    """
    if path.suffix.lower() in (".tif", ".tiff"):
        return read_image(path)
    try:
        with Image.open(path) as image:
            upright = ImageOps.exif_transpose(image)
            array = np.asarray(upright if upright.mode in _PIL_MODES else upright.convert("RGB"))
    except OSError as err:
        raise DataFormatError(f"{path}: cannot read as an image ({err})") from err
    array = array.astype(array.dtype.newbyteorder("="), copy=False)  # I;16B is big-endian
    if array.dtype.kind == "i":  # mode "I": 32-bit integers, 16-bit data in practice
        if array.size and (array.min() < 0 or array.max() > np.iinfo(np.uint16).max):
            raise DataFormatError(f"{path}: integer image values must be within 0..65535")
        array = array.astype(np.uint16)
    return to_rgb8(array, path)


def write_prob_maps(folder: Path, maps: ProbMaps, maps_format: str) -> None:
    """``center.png`` and ``boundary.png`` (probability × 255, rounded) or ``maps.npz`` (float32), each file
    written aside and renamed."""
    if maps_format == "npz":
        save_npz(folder / "maps.npz", center=maps.center, boundary=maps.boundary)
        return
    if maps_format != "png":
        raise ValueError(f"maps_format must be one of {', '.join(MAPS_FORMATS)}; got {maps_format!r}")
    for name, values in (("center", maps.center), ("boundary", maps.boundary)):
        pixels = np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)
        output = TempOutput(folder / f"{name}.png")
        Image.fromarray(pixels).save(output.path, format="PNG")
        output.commit()


MICROSCOPE_MPP = (0.05, 5.0)
"""A resolution recorded in an image file is believed only in this range (µm/px): a 300-dpi scan says 84.7."""
SAME_SCALE = 0.02
"""An image within 2% of the model's µm/px is predicted as it is."""


def recorded_mpp(path: Path) -> float | None:
    """The µm/px a TIFF records (Aperio's or OME's description, else its resolution tags), when it is a
    microscope's; None for other files (a PNG's or JPEG's dpi describes a print, not a microscope)."""
    if path.suffix.lower() not in (".tif", ".tiff"):
        return None
    import tifffile

    from cellseg.resolution import mpp_from_tags, parse_mpp_from_description

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            mpp = parse_mpp_from_description(page.description or "") or mpp_from_tags(page)
    except Exception:  # an unreadable file fails with its own error when its pixels are read
        return None
    return mpp if mpp is not None and MICROSCOPE_MPP[0] <= mpp <= MICROSCOPE_MPP[1] else None


def scale_factor(image_mpp: float | None, model_mpp: float) -> float:
    """Model pixels per image pixel (1 when unknown or within :data:`SAME_SCALE`)."""
    if image_mpp is None:
        return 1.0
    factor = image_mpp / model_mpp
    return 1.0 if abs(factor - 1.0) <= SAME_SCALE else factor


def resized(image: np.ndarray, factor: float) -> np.ndarray:
    """The image at the model's scale: area-averaged when shrunk, bilinear when enlarged."""
    if factor == 1.0:
        return image
    h, w = image.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)


def back_to_image(labels: LabelMap, maps: ProbMaps | None, height: int, width: int):
    """The nuclei's label map (and maps) predicted at the model's scale, resampled to the image's ``height ×
    width``: nearest neighbour on the ids (a nucleus too small to keep a pixel centre is lost), bilinear on the
    maps."""
    ids = cv2.resize(labels.ids, (width, height), interpolation=cv2.INTER_NEAREST)
    kept = np.unique(ids[ids > 0])
    lookup = np.zeros(len(labels) + 1, np.int32)
    lookup[kept] = np.arange(1, len(kept) + 1)
    back = LabelMap(lookup[ids], labels.classes[kept - 1], labels.source[kept - 1])
    if maps is not None:
        maps = ProbMaps(
            *(
                cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR)
                for m in (maps.center, maps.boundary)
            )
        )
    return back, maps


def _read_all(paths: list[Path], factors: list[float], sizes: dict) -> Iterator[np.ndarray]:
    """Each image at the model's scale; ``sizes`` gets its own ``(height, width)`` as it is read."""
    for path, factor in zip(paths, factors, strict=True):
        image = read_any_image(path)
        sizes[path] = image.shape[:2]
        yield resized(image, factor)


def predict_folder(
    model: CellMaskRCNN,
    in_dir: str | Path,
    out_dir: str | Path,
    params: PredictParams,
    device: torch.device,
    postproc: PostprocParams | None = None,
    maps_format: str | None = None,
    record: dict | None = None,
    *,
    class_names: tuple[str, ...],
    model_mpp: float | None = None,
    image_mpp: float | None = None,
) -> dict:
    """Predict every image of ``in_dir`` into ``out_dir/<stem>/``; return the instance count per image and
    class, by name (``class_names``: the model's, class 1 first).

    Only the per-image folders (and ``provenance.json``) are replaced, so other content of ``out_dir`` is left
    alone. ``postproc`` adds the map-guided steps; ``maps_format`` (``png`` or ``npz``) also writes the heads'
    maps; ``record`` (:func:`cellseg.provenance.provenance` and the settings) goes to ``provenance.json`` with
    the names of the images.

    Each image is predicted at the model's resolution (``model_mpp``, µm/px): its own is ``image_mpp`` (the
    user's ``--mpp``), else what its TIFF records (:func:`recorded_mpp`); an image at another resolution is
    resampled to the model's and its nuclei back to the image's pixels. An image whose resolution is unknown is
    predicted as it is, with one warning naming how many.
    """
    if maps_format is not None and not getattr(model, "has_aux", False):
        raise CellsegError(
            "writing maps needs a model with the auxiliary heads (trained with aux.enabled: true)"
        )
    paths = list_images(in_dir)
    out_dir = Path(out_dir)
    mpps = [image_mpp or recorded_mpp(p) for p in paths]
    factors = [scale_factor(m, model_mpp) if model_mpp else 1.0 for m in mpps]
    unknown = [p.name for p, m in zip(paths, mpps, strict=True) if m is None]
    if unknown and model_mpp:
        print(
            f"warning: {len(unknown)} of {len(paths)} images record no resolution (e.g. {unknown[0]}): predicted "
            f"as if at the model's {model_mpp:g} µm/px; give --mpp if they are not",
            file=sys.stderr,
        )
    if record is not None:
        record = {
            **record,
            "images": [p.name for p in paths],
            "images_mpp": dict(zip([p.name for p in paths], mpps, strict=True)),
        }
        write_json(out_dir / PROVENANCE_FILE, record)
    rule = NucleusRule.of(params)
    counts = {}
    sizes: dict[Path, tuple[int, int]] = {}
    predictions = predict_images_maps(model, _read_all(paths, factors, sizes), params, device, postproc)
    with open_sinks(["tifs"], SinkContext(out_dir, class_names=class_names)) as (tifs,):
        for path, factor, (inst, maps) in tqdm(
            zip(paths, factors, predictions, strict=True), total=len(paths), desc="predict", unit="img"
        ):
            labels = label_map(inst, rule)
            if factor != 1.0:
                labels, maps = back_to_image(labels, maps, *sizes[path])
            found = labels.instances(inst.scores)  # the nuclei (cellseg.nuclei.nuclei), at the image's pixels
            tifs.add(Nuclei(found, np.arange(1, len(found) + 1), image=path.stem))
            if maps_format:
                write_prob_maps(out_dir / path.stem, maps, maps_format)
            counts[path.name] = {
                name: int(np.count_nonzero(found.labels == k)) for k, name in enumerate(class_names, start=1)
            }
    return counts


def main(argv: list[str] | None = None, prog: str = "cellseg predict") -> None:
    """``cellseg predict CHECKPOINT IMAGE_FOLDER OUT_DIR``: reads ``predict.*``, ``postproc.*`` of params.yaml."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="e.g. models/best.pt")
    parser.add_argument("image_folder", help=f"images to predict ({', '.join(IMAGE_SUFFIXES)})")
    parser.add_argument(
        "out_dir",
        help="written: <stem>/class{k}.tif per image (class k: the model's k-th class; absent when no "
        "instance), and provenance.json (the "
        "checkpoint's sha256 and training params, the cellseg version, the settings, the images)",
    )
    parser.add_argument(
        "--thresholds",
        type=Path,
        help="tuned thresholds (default: thresholds.json next to the checkpoint, if there is one; "
        "otherwise predict.label_score_threshold, predict.mask_threshold and postproc.peak_threshold of "
        "params.yaml)",
    )
    parser.add_argument(
        "--mpp",
        type=float,
        help="the images' resolution in µm/px (default: what each TIFF records; otherwise the model's own is "
        "assumed, with a warning): images at another resolution are resampled to the model's and their nuclei "
        "written back at the image's pixels",
    )
    parser.add_argument(
        "--maps",
        choices=MAPS_FORMATS,
        help="also write the centre and boundary probabilities: <stem>/{center,boundary}.png or <stem>/maps.npz",
    )
    args = parser.parse_args(argv)
    if args.mpp is not None and not MICROSCOPE_MPP[0] <= args.mpp <= MICROSCOPE_MPP[1]:
        raise CellsegError(
            f"--mpp {args.mpp} is not a microscope's µm/px ({MICROSCOPE_MPP[0]}..{MICROSCOPE_MPP[1]})"
        )
    params = load_params()
    device = select_device(params.predict.device, "predict.device")
    model = open_model(args.checkpoint, params, device, args.thresholds or BESIDE)
    print(model.describe_thresholds())
    counts = predict_folder(
        model.network,
        args.image_folder,
        args.out_dir,
        model.predict,
        device,
        model.postproc,
        args.maps,
        model.provenance(),
        class_names=model.class_names,
        model_mpp=model.mpp,
        image_mpp=args.mpp,
    )
    print(json.dumps(counts, indent=2))
