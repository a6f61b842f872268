"""Reading and writing the raw dataset format (tif) and the prepared format (npz).

Raw layout (DESIGN.md §1)::

    <raw>/train/<sample>/image.tif                 RGB(A) image, often LZW-compressed
    <raw>/train/<sample>/class1.tif .. class4.tif  label images (float64 in the real data); absent = no instance
    <raw>/test_release/<name>.tif                  test images
    <raw>/test_image_name_to_ids.json              [{"file_name", "id", "height", "width"}, ...]

In a class file each distinct non-zero value is one instance. One id counter runs across the class files of an
image, so ids are not contiguous per class. Prepared samples keep exactly those ids, one row per class, so no
instance identity is ever lost (touching cells are never merged).

Every error raised here is a :class:`DataFormatError` whose message starts with the offending file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from cellseg import NUM_CLASSES, CellsegError
from cellseg.fsutil import save_npz

IMAGE_FILE = "image.tif"
CLASS_FILES = tuple(f"class{k}.tif" for k in range(1, NUM_CLASSES + 1))
TEST_DIR = "test_release"
TEST_MAPPING = "test_image_name_to_ids.json"
_INT32_MAX = np.iinfo(np.int32).max


class DataFormatError(CellsegError, ValueError):
    """Input that does not follow the dataset format. The message names the file and what is wrong."""


# --------------------------------------------------------------------------------------------------- tif reading
def _read_tif(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    try:
        array = tifffile.imread(path)
    except Exception as err:  # tifffile raises many types for corrupt or truncated files
        raise DataFormatError(f"{path}: cannot read as tif ({type(err).__name__}: {err})") from err
    if array.size == 0:  # tifffile warns and returns nothing when no valid page is found
        raise DataFormatError(f"{path}: cannot read as tif (no image data: corrupt or empty file)")
    return array


def to_rgb8(array: np.ndarray, source: str | Path = "<array>") -> np.ndarray:
    """Convert a grayscale, RGB or RGBA image of uint8, uint16 or float in [0, 1] to ``uint8 H×W×3``.

    Alpha is dropped, grayscale is repeated to three channels, 16-bit data is scaled by 255/65535 and
    channel-first (planar) arrays are moved to channel-last.
    """
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise DataFormatError(
            f"{source}: expected a grayscale, RGB or RGBA image, got array of shape {a.shape}"
        )
    if a.shape[-1] == 4:
        a = a[..., :3]
    elif a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if a.dtype == np.uint8:
        pass
    elif a.dtype == np.uint16:
        a = np.round(a.astype(np.float32) * (255.0 / 65535.0)).astype(np.uint8)
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise DataFormatError(f"{source}: float image values must be finite and within [0, 1]")
        a = np.round(a * 255.0).astype(np.uint8)
    else:
        raise DataFormatError(
            f"{source}: unsupported image dtype {a.dtype} (use uint8, uint16 or float in [0, 1])"
        )
    if min(a.shape[:2]) < 1:
        raise DataFormatError(f"{source}: empty image of shape {a.shape}")
    return np.ascontiguousarray(a)


def read_image(path: str | Path) -> np.ndarray:
    """Read an image tif as ``uint8 H×W×3`` (RGBA, grayscale and 16-bit are converted; LZW via imagecodecs)."""
    path = Path(path)
    return to_rgb8(_read_tif(path), path)


def to_label_image(array: np.ndarray, source: str | Path = "<array>") -> np.ndarray:
    """Check that ``array`` is an integral, non-negative label image and return it as ``int32 H×W``.

    The real masks are float64. A non-integral, negative or non-finite value is an error, never rounded.
    """
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    elif a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 2:
        raise DataFormatError(f"{source}: a label image must be 2-D, got shape {a.shape}")
    if np.issubdtype(a.dtype, np.floating):
        bad = ~np.isfinite(a)
        if bad.any():
            raise DataFormatError(f"{source}: {int(bad.sum())} non-finite label value(s) (NaN or inf)")
        fractional = a != np.floor(a)
        if fractional.any():
            value = a[fractional][0]
            raise DataFormatError(
                f"{source}: {int(fractional.sum())} non-integral label value(s), e.g. {value!r}; "
                "instance ids must be whole numbers"
            )
    elif not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
        raise DataFormatError(f"{source}: unsupported label dtype {a.dtype}")
    if a.size and a.min() < 0:
        raise DataFormatError(
            f"{source}: negative label value {a.min()!r}; ids must be >= 0 (0 = background)"
        )
    if a.size and a.max() > _INT32_MAX:
        raise DataFormatError(f"{source}: label value {a.max()!r} exceeds the int32 range")
    return a.astype(np.int32)


def read_label(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """Read a class label tif as ``int32 H×W`` and check that it matches the image ``shape``."""
    path = Path(path)
    labels = to_label_image(_read_tif(path), path)
    if labels.shape != tuple(shape):
        raise DataFormatError(
            f"{path}: mask shape {labels.shape[0]}×{labels.shape[1]} differs from the image's {shape[0]}×{shape[1]}"
        )
    return labels


# ----------------------------------------------------------------------------------------------- raw dataset
@dataclass(frozen=True)
class RawTrainSample:
    """One annotated sample folder: the image and, per class, its label file or ``None`` when absent."""

    name: str
    image_path: Path
    class_paths: tuple[Path | None, ...]


@dataclass(frozen=True)
class TestEntry:
    """One row of the test mapping json: the image file and the id the submission must use."""

    file_name: str
    image_id: int
    height: int
    width: int


def list_train_samples(raw_dir: str | Path) -> list[RawTrainSample]:
    """List ``<raw>/train/<sample>/`` folders in name order. Every folder must hold ``image.tif``."""
    train_dir = Path(raw_dir) / "train"
    if not train_dir.is_dir():
        raise DataFormatError(f"{train_dir}: missing folder (expected <raw>/train/<sample>/image.tif)")
    samples = []
    for folder in sorted(p for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        image_path = folder / IMAGE_FILE
        if not image_path.is_file():
            raise DataFormatError(f"{folder}: train folder without {IMAGE_FILE}")
        class_paths = tuple((folder / f) if (folder / f).is_file() else None for f in CLASS_FILES)
        samples.append(RawTrainSample(folder.name, image_path, class_paths))
    if not samples:
        raise DataFormatError(f"{train_dir}: no samples (expected <sample>/{IMAGE_FILE} folders)")
    return samples


def read_train_sample(sample: RawTrainSample) -> tuple[np.ndarray, np.ndarray]:
    """Read one sample as ``(image uint8 H×W×3, labels int32 4×H×W)``; row k holds the ids of ``class{k+1}``."""
    image = read_image(sample.image_path)
    labels = np.zeros((NUM_CLASSES, *image.shape[:2]), dtype=np.int32)
    for k, path in enumerate(sample.class_paths):
        if path is not None:
            labels[k] = read_label(path, image.shape[:2])
    return image, labels


def read_test_mapping(path: str | Path) -> list[TestEntry]:
    """Parse ``test_image_name_to_ids.json`` and check its fields, id uniqueness and name uniqueness."""
    path = Path(path)
    try:
        rows = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise DataFormatError(f"{path}: file not found") from err
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}: invalid JSON ({err})") from err
    if not isinstance(rows, list):
        raise DataFormatError(f"{path}: expected a JSON list of {{file_name, id, height, width}} objects")
    entries = []
    for i, row in enumerate(rows):
        try:
            entry = TestEntry(str(row["file_name"]), int(row["id"]), int(row["height"]), int(row["width"]))
        except (KeyError, TypeError, ValueError) as err:
            raise DataFormatError(
                f"{path}: entry {i} needs file_name, id, height and width ({err!r})"
            ) from err
        entries.append(entry)
    for field in ("file_name", "image_id"):
        values = [getattr(e, field) for e in entries]
        dupes = sorted({v for v in values if values.count(v) > 1})
        if dupes:
            raise DataFormatError(f"{path}: duplicate {field} values {dupes[:5]}")
    return entries


def list_test_images(raw_dir: str | Path) -> list[tuple[TestEntry, Path]]:
    """Pair every test image with its mapping entry. Missing images or unmapped files are errors.

    A dataset without test side (neither ``test_release/`` nor the mapping) gives an empty list.
    """
    raw_dir = Path(raw_dir)
    test_dir, mapping_path = raw_dir / TEST_DIR, raw_dir / TEST_MAPPING
    if not test_dir.exists() and not mapping_path.exists():
        return []
    if not test_dir.is_dir():
        raise DataFormatError(f"{test_dir}: missing folder, but {mapping_path.name} exists")
    entries = read_test_mapping(mapping_path)
    on_disk = {p.name: p for p in test_dir.iterdir() if p.suffix.lower() in (".tif", ".tiff")}
    mapped = {e.file_name for e in entries}
    missing = sorted(mapped - on_disk.keys())
    if missing:
        raise DataFormatError(
            f"{test_dir}: {len(missing)} image(s) of {mapping_path.name} missing, e.g. {missing[:3]}"
        )
    unmapped = sorted(on_disk.keys() - mapped)
    if unmapped:
        raise DataFormatError(
            f"{mapping_path}: {len(unmapped)} file(s) in {TEST_DIR}/ have no entry, e.g. {unmapped[:3]}"
        )
    return [(e, on_disk[e.file_name]) for e in entries]


# -------------------------------------------------------------------------------------------- raw writing
def write_image_tif(path: str | Path, rgb: np.ndarray) -> None:
    """Write an RGB image the way the real data stores it: RGBA (alpha 255), uint8, LZW with predictor."""
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    tifffile.imwrite(
        path, rgba, photometric="rgb", compression="lzw", predictor=True, extrasamples=["unassalpha"]
    )


def write_label_tif(path: str | Path, labels: np.ndarray) -> None:
    """Write a label image the way the real data stores it: float64, uncompressed."""
    tifffile.imwrite(path, np.asarray(labels, dtype=np.float64), photometric="minisblack")


# ------------------------------------------------------------------------------------------ prepared format
def save_train_npz(path: str | Path, image: np.ndarray, labels: np.ndarray) -> None:
    """Store a prepared training sample: ``image`` uint8 H×W×3 and ``labels`` int32 4×H×W."""
    save_npz(path, image=image, labels=labels.astype(np.int32, copy=False))


def save_test_npz(path: str | Path, image: np.ndarray, image_id: int) -> None:
    """Store a prepared test image with the id its predictions must carry in the submission."""
    save_npz(path, image=image, image_id=np.int64(image_id))


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Load every array of an ``.npz`` eagerly (a lazy NpzFile would keep the file open)."""
    path = Path(path)
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError as err:
        raise DataFormatError(f"{path}: file not found") from err
    except Exception as err:
        raise DataFormatError(f"{path}: cannot read as npz ({type(err).__name__}: {err})") from err
