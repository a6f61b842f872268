"""Reading and writing the raw dataset format (tif) and the prepared format (npz).

Raw layout (README "Your own data")::

    <raw>/train/<sample>/image.tif                 RGB(A) image, often LZW-compressed
    <raw>/train/<sample>/class1.tif .. classK.tif  label images (float64 in the real data); absent = no instance
    <raw>/test_release/<name>.tif                  test images
    <raw>/test_image_name_to_ids.json              [{"file_name", "id", "height", "width"}, ...]

K is the number of names in params.yaml's ``classes``; ``class<k>.tif`` holds the instances of ``classes[k - 1]``
and a class file beyond K is an error. In a class file each distinct non-zero value is one instance. One id counter runs across the class files of an
image, so ids are not contiguous per class. Prepared samples keep exactly those ids, one row per class, so no
instance identity is ever lost (touching cells are never merged).

Every error raised here is a :class:`DataFormatError` whose message starts with the offending file.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from skimage.util import img_as_ubyte

from cellseg import CellsegError
from cellseg.fsutil import save_npz

IMAGE_FILE = "image.tif"
TEST_DIR = "test_release"
TEST_MAPPING = "test_image_name_to_ids.json"
_INT32_MAX = np.iinfo(np.int32).max
_INT64_MAX = np.iinfo(np.int64).max
_PHOTOMETRICS = (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.RGB)
_LOOKS_LIKE_SAMPLE_FILE = re.compile(r"(image|class\s*\d*)\.(tiff?|png|jpe?g)", re.IGNORECASE)
_CLASS_FILE = re.compile(r"class([1-9]\d*)\.tif")
_BIT_DEPTHS = (8, 10, 12, 14, 16)
"""Sensor bit depths of 16-bit data; the smallest one holding an image's maximum sets its white level."""


class DataFormatError(CellsegError, ValueError):
    """Input that does not follow the dataset format. The message names the file and what is wrong."""


class DataWarning(UserWarning):
    """Input that is used, but with something ignored that the user should know about."""


def class_file(k: int) -> str:
    """The file name of class ``k`` (1-based) in a sample folder: ``class<k>.tif``."""
    return f"class{k}.tif"


def class_files(num_classes: int) -> tuple[str, ...]:
    """``class1.tif .. class<num_classes>.tif``."""
    return tuple(class_file(k) for k in range(1, num_classes + 1))


def check_class_file(path: Path, num_classes: int) -> None:
    """A ``class<J>.tif`` with J > ``num_classes`` is an error: its cells would be trained as background."""
    match = _CLASS_FILE.fullmatch(path.name)
    if match and int(match.group(1)) > num_classes:
        raise DataFormatError(
            f"{path}: class {match.group(1)}, but `classes` in params.yaml has {num_classes} name(s); add the "
            f"class's name to `classes` (class<k>.tif is the k-th name) or remove the file"
        )


# --------------------------------------------------------------------------------------------------- tif reading
def _read_tif(path: Path) -> np.ndarray:
    """The single image of a tif. Several pages or a colour model other than grey/RGB(A) is an error: such
    files would otherwise read as a planar RGB(A) image (3 or 4 pages) or as RGBA (CMYK) with wrong colours."""
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    try:
        with tifffile.TiffFile(path) as tif:
            pages = len(tif.pages)
            photometric = tif.pages[0].photometric if pages else None
            array = tif.asarray() if pages == 1 else None
    except Exception as err:  # tifffile raises many types for corrupt or truncated files
        raise DataFormatError(f"{path}: cannot read as tif ({type(err).__name__}: {err})") from err
    if pages > 1:
        raise DataFormatError(f"{path}: {pages} pages; expected a single-page tif (one image per file)")
    if photometric is not None and photometric not in _PHOTOMETRICS:
        raise DataFormatError(
            f"{path}: colour model {photometric.name} is not supported (expected greyscale or RGB(A))"
        )
    if array is None or array.size == 0:  # no valid page: corrupt or empty file
        raise DataFormatError(f"{path}: cannot read as tif (no image data: corrupt or empty file)")
    return array


def to_rgb8(array: np.ndarray, source: str | Path = "<array>") -> np.ndarray:
    """Convert a grayscale, RGB or RGBA image of uint8, uint16 or float in [0, 1] to ``uint8 H×W×3``.

    Alpha is dropped, grayscale is repeated to three channels and channel-first (planar) arrays are moved to
    channel-last. 16-bit data is scaled by its bit depth: the smallest of 8, 10, 12, 14 or 16 bits that holds
    the image's maximum, so 12-bit camera data (stored in 16-bit tifs) keeps its contrast instead of turning
    nearly black. Bool and float use scikit-image's ``img_as_ubyte``.
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
    if min(a.shape[:2]) < 1:
        raise DataFormatError(f"{source}: empty image of shape {a.shape}")
    if a.dtype == np.uint8:
        pass
    elif a.dtype == np.uint16:
        white = 2 ** next(b for b in _BIT_DEPTHS if a.max() < 2**b) - 1
        a = np.round(a.astype(np.float32) * (255.0 / white)).astype(np.uint8)
    elif a.dtype == np.bool_:
        a = img_as_ubyte(a)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise DataFormatError(f"{source}: float image values must be finite and within [0, 1]")
        a = img_as_ubyte(a)
    else:
        raise DataFormatError(
            f"{source}: unsupported image dtype {a.dtype} (use uint8, uint16 or float in [0, 1])"
        )
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
        exact = 2 ** (np.finfo(a.dtype).nmant + 1)  # float32: 2**24; above it ids are rounded when written
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
        if a.size and a.max() > exact:
            raise DataFormatError(
                f"{source}: label value {int(a.max())} above {exact}, the largest id that {a.dtype} stores "
                "exactly (neighbouring ids may have merged); save label images as float64 or integers"
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


def list_train_samples(raw_dir: str | Path, num_classes: int) -> list[RawTrainSample]:
    """List ``<raw>/train/<sample>/`` folders in name order. Every folder must hold ``image.tif``.

    ``num_classes`` (K, the length of params.yaml's ``classes``): each sample has ``class1.tif .. classK.tif``
    or fewer. A file that looks like an image or class file but is not one of the exact names (``Class1.tif``,
    ``class1.tiff``, ``image.png``), or a class file beyond K (``class5.tif`` with four classes), is an error:
    ignoring it would train that sample's cells as background. Any other file (notes, thumbnails) only gets a
    warning; hidden files are skipped.
    """
    train_dir = Path(raw_dir) / "train"
    if not train_dir.is_dir():
        raise DataFormatError(f"{train_dir}: missing folder (expected <raw>/train/<sample>/image.tif)")
    samples = []
    for folder in sorted(p for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        _check_sample_files(folder, num_classes)
        image_path = folder / IMAGE_FILE
        if not image_path.is_file():
            raise DataFormatError(f"{folder}: train folder without {IMAGE_FILE}")
        class_paths = tuple(
            (folder / f) if (folder / f).is_file() else None for f in class_files(num_classes)
        )
        samples.append(RawTrainSample(folder.name, image_path, class_paths))
    if not samples:
        raise DataFormatError(f"{train_dir}: no samples (expected <sample>/{IMAGE_FILE} folders)")
    return samples


def _check_sample_files(folder: Path, num_classes: int) -> None:
    expected = (IMAGE_FILE, *class_files(num_classes))
    for path in sorted(folder.iterdir()):
        if path.name in expected or path.name.startswith("."):
            continue
        check_class_file(path, num_classes)
        if _LOOKS_LIKE_SAMPLE_FILE.fullmatch(path.name):
            raise DataFormatError(
                f"{path}: unexpected file name; a sample holds exactly {', '.join(expected)} "
                "(lower case, .tif), so this file would be ignored"
            )
        warnings.warn(f"{path}: unexpected file in a sample folder, ignored", DataWarning, stacklevel=3)


def read_train_sample(sample: RawTrainSample) -> tuple[np.ndarray, np.ndarray]:
    """Read one sample as ``(image uint8 H×W×3, labels int32 K×H×W)``; row k holds the ids of ``class{k+1}``
    (K: the sample's ``class_paths``, one per class of ``classes``)."""
    image = read_image(sample.image_path)
    labels = np.zeros((len(sample.class_paths), *image.shape[:2]), dtype=np.int32)
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
    entries = [_test_entry(path, i, row) for i, row in enumerate(rows)]
    for field in ("file_name", "image_id"):
        values = [getattr(e, field) for e in entries]
        dupes = sorted({v for v in values if values.count(v) > 1})
        if dupes:
            raise DataFormatError(f"{path}: duplicate {field} values {dupes[:5]}")
    return entries


def _test_entry(path: Path, index: int, row: object) -> TestEntry:
    """One mapping row, checked strictly: a value of the wrong type is an error, never converted."""
    fields = ("file_name", "id", "height", "width")
    if not isinstance(row, dict) or any(f not in row for f in fields):
        raise DataFormatError(f"{path}: entry {index} needs file_name, id, height and width (got {row!r})")
    name = row["file_name"]
    if not isinstance(name, str) or not name or Path(name).name != name:
        raise DataFormatError(f"{path}: entry {index}: file_name must be a file name, got {name!r}")
    for field, low in (("id", 1), ("height", 1), ("width", 1)):
        value = row[field]
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= _INT64_MAX:
            raise DataFormatError(
                f"{path}: entry {index} ({name}): {field} must be a whole number in [{low}, 2**63 - 1], "
                f"got {value!r}"
            )
    return TestEntry(name, row["id"], row["height"], row["width"])


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
    on_disk = {p.name: p for p in visible_files(test_dir, (".tif", ".tiff"))}
    mapped = {e.file_name for e in entries}
    missing = sorted(mapped - on_disk.keys())
    if missing:
        raise DataFormatError(
            f"{test_dir}: {len(missing)} image(s) of {mapping_path.name} missing, e.g. {missing[:3]}"
        )
    stems: dict[str, str] = {}
    for name in sorted(on_disk):
        stem = Path(name).stem
        if stem in stems:
            raise DataFormatError(
                f"{test_dir}: {stems[stem]} and {name} have the same stem, so both would be written to "
                f"{stem}.npz; rename one"
            )
        stems[stem] = name
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
    """Store a prepared training sample: ``image`` uint8 H×W×3 and ``labels`` int32 K×H×W (one row per class)."""
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


def visible_files(folder: str | Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The files of ``folder`` with one of ``suffixes`` (any case), in name order, without hidden ones.

    The one listing every reader uses: a dot-file (``._x.tif`` from macOS, ``.x.npz`` from an editor) is never
    data. A missing folder lists nothing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith(".")
    )


def list_samples(split_dir: Path) -> list[Path]:
    """The prepared ``*.npz`` samples of a split, in name order; a missing or empty split is an error."""
    files = visible_files(split_dir, (".npz",))
    if not files:
        raise DataFormatError(
            f"{split_dir}: no prepared samples to evaluate (run the prepare stage; "
            "data.val_fraction must leave at least one validation image)"
        )
    return files
