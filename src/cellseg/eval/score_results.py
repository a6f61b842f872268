"""Score any COCO results file against a folder of truth: ``cellseg score RESULTS TRUTH_DIR MAPPING_JSON``.

RESULTS is a COCO results JSON (``[{"image_id", "category_id", "segmentation": RLE, "score"}, ...]``) or a
``submission.zip`` holding ``test-results.json``. TRUTH_DIR holds one ``<stem>/class1..K.tif`` folder per image
of the mapping (the layout of ``test_truth/`` or of a raw ``train/``; ``<stem>`` is the mapping's file name
without extension); a missing folder or class file means no nucleus. MAPPING_JSON is the
``test_image_name_to_ids.json`` that gave the results their ``image_id``.

Figures: COCO mask AP (:func:`cellseg.eval.coco_metrics.evaluate`: AP50 and AP at the leaderboard's 100 detections per
image and class) and the nuclei metrics of :mod:`cellseg.eval.nuclei_metrics` on label maps made from the results
scoring at least ``--score-threshold``, or, with ``--thresholds models/thresholds.json``, at least the tune stage's
label-score threshold of their class (per class where the file has them, as ``evaluate`` applies them).

The classes (K and their names, shown in the table) are ``--classes`` where given, else ``classes`` of the
params.yaml in the current folder, else the four ``class1..class4``; a category id or a class file beyond K is
an error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from cellseg import DEFAULT_CLASSES, CellsegError
from cellseg.data.io import TestEntry, check_class_file, class_files, read_label, read_test_mapping
from cellseg.eval.coco_metrics import LEADERBOARD_MAX_DETECTIONS, class_key, evaluate
from cellseg.eval.nuclei_metrics import SplitScores, per_image_csv, score_split
from cellseg.instances import Instances, crop_to_box
from cellseg.nuclei import DEFAULT_MIN_KEPT_FRACTION, NucleusRule
from cellseg.outputs.coco import RESULTS_FILE
from cellseg.rle import decode

DEFAULT_SCORE_THRESHOLD = 0.5


class ResultsError(CellsegError, ValueError):
    """A results file that cannot be scored; the message names the file (and row) and the problem."""


MAX_RESULTS_BYTES = 1 << 30
"""The largest results JSON read (1 GiB, unpacked): millions of masks; parsing needs several times it in memory."""
MAX_COMPRESSION_RATIO = 200
"""Unpacked / packed size beyond which a zip entry is refused as a zip bomb (real results pack about 5:1)."""
RATIO_FLOOR = 1 << 20
"""Entries unpacking to less than this (1 MiB) are read whatever their ratio: they cannot hurt."""


# -------------------------------------------------------------------------------------------------- reading
def read_results(path: str | Path) -> list[dict]:
    """The rows of a COCO results JSON, or of the ``test-results.json`` inside a ``.zip``.

    A zip must hold that one file at its root, unpacking to at most :data:`MAX_RESULTS_BYTES` and at most
    :data:`MAX_COMPRESSION_RATIO` times its packed size; it is read by a bounded read, so a header that
    understates the size cannot make it unpack more. Anything else is refused before it is unpacked.
    """
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"{path}: results file not found")
    try:
        if zipfile.is_zipfile(path):
            data = _read_zip_entry(path)
        else:
            size = path.stat().st_size
            if size > MAX_RESULTS_BYTES:
                raise ResultsError(f"{path}: {size:,} bytes, more than a results file may have ({_limit()})")
            data = path.read_bytes()
        rows = json.loads(data.decode("utf-8"))
    except (
        OSError,
        EOFError,
        RuntimeError,  # an encrypted entry
        NotImplementedError,  # a compression method zipfile lacks
        UnicodeDecodeError,
        zipfile.BadZipFile,
        zlib.error,
        json.JSONDecodeError,
    ) as err:
        raise ResultsError(f"{path}: cannot read the results ({type(err).__name__}: {err})") from err
    if not isinstance(rows, list):
        raise ResultsError(f"{path}: expected a JSON list of COCO results rows, got {type(rows).__name__}")
    return rows


def _limit() -> str:
    return f"{MAX_RESULTS_BYTES:,} bytes"


def _read_zip_entry(path: Path) -> bytes:
    """The bytes of the zip's ``test-results.json``, after checking what the zip declares (see
    :func:`read_results`)."""
    with zipfile.ZipFile(path) as archive:
        entries = archive.infolist()
        names = [e.filename for e in entries]
        others = [name for name in names if name != RESULTS_FILE]
        listed = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        if RESULTS_FILE not in names:
            holds = f" (it holds {listed})" if others else " (it is empty)"
            raise ResultsError(f"{path}: no {RESULTS_FILE} at the root of the zip{holds}")
        if others or names.count(RESULTS_FILE) > 1:
            extra = listed or f"{names.count(RESULTS_FILE)} entries of that name"
            raise ResultsError(f"{path}: the zip must hold {RESULTS_FILE} alone; it also holds {extra}")
        (entry,) = entries
        if entry.file_size > MAX_RESULTS_BYTES:
            raise ResultsError(
                f"{path}: {RESULTS_FILE} unpacks to {entry.file_size:,} bytes, more than a results file may "
                f"have ({_limit()}); not unpacked"
            )
        ratio = entry.file_size / max(entry.compress_size, 1)
        if entry.file_size > RATIO_FLOOR and ratio > MAX_COMPRESSION_RATIO:
            raise ResultsError(
                f"{path}: {RESULTS_FILE} unpacks to {ratio:.0f} times its packed size ({entry.file_size:,} "
                f"bytes), far beyond any results file (at most {MAX_COMPRESSION_RATIO}): not unpacked"
            )
        with archive.open(entry) as stream:
            data = stream.read(entry.file_size + 1)  # bounded: never more than the declared size
    if len(data) != entry.file_size:
        raise ResultsError(
            f"{path}: {RESULTS_FILE} unpacks to more or fewer bytes than the zip declares ({entry.file_size:,})"
        )
    return data


def read_truth(
    truth_dir: str | Path, entries: list[TestEntry], num_classes: int
) -> tuple[list[Instances], list[str]]:
    """Ground truth of every mapped image (classes 1..``num_classes``), and the stems whose folder is missing
    (no nucleus there)."""
    truth_dir = Path(truth_dir)
    if not truth_dir.is_dir():
        raise ResultsError(f"{truth_dir}: truth folder not found")
    truths, missing = [], []
    for entry in entries:
        folder = truth_dir / Path(entry.file_name).stem
        rows = np.zeros((num_classes, entry.height, entry.width), np.int32)
        if not folder.is_dir():
            missing.append(folder.name)
        else:
            for path in folder.iterdir():
                check_class_file(path, num_classes)
        for k, name in enumerate(class_files(num_classes)):
            if (folder / name).is_file():
                rows[k] = read_label(folder / name, (entry.height, entry.width))
        truths.append(Instances.from_label_rows(rows))
    return truths, missing


def _row_error(path: Path, i: int, problem: str) -> ResultsError:
    return ResultsError(f"{path}: row {i}: {problem}")


def _mask(row: dict, entry: TestEntry, path: Path, i: int) -> np.ndarray:
    segmentation = row.get("segmentation")
    if not isinstance(segmentation, dict) or "size" not in segmentation or "counts" not in segmentation:
        raise _row_error(
            path, i, "'segmentation' must be an RLE {size: [h, w], counts} (polygons are not scored)"
        )
    if list(segmentation["size"]) != [entry.height, entry.width]:
        raise _row_error(
            path,
            i,
            f"mask size {segmentation['size']} differs from {entry.file_name}'s {entry.height}x{entry.width}",
        )
    counts = segmentation["counts"]
    try:
        if isinstance(counts, list):
            rle = mask_utils.frPyObjects(segmentation, entry.height, entry.width)
        else:
            rle = {
                "size": [entry.height, entry.width],
                "counts": counts.encode() if isinstance(counts, str) else counts,
            }
        return decode(rle)
    except Exception as err:  # pycocotools raises bare errors on corrupt counts
        raise _row_error(path, i, f"cannot decode the RLE ({type(err).__name__}: {err})") from err


def results_to_instances(
    rows: list[dict], entries: list[TestEntry], path: Path, mapping: Path, num_classes: int
) -> list[Instances]:
    """One :class:`Instances` per mapping entry (box-local crops of the decoded masks), in mapping order; a
    category id outside 1..``num_classes`` is an error."""
    index = {e.image_id: n for n, e in enumerate(entries)}
    per_image: list[list[tuple[int, float, np.ndarray]]] = [[] for _ in entries]
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise _row_error(path, i, f"expected an object, got {type(row).__name__}")
        try:
            image_id, category, score = int(row["image_id"]), int(row["category_id"]), float(row["score"])
        except (KeyError, TypeError, ValueError) as err:
            raise _row_error(path, i, f"needs image_id, category_id and a numeric score ({err!r})") from err
        if image_id not in index:
            raise _row_error(path, i, f"image_id {image_id} is not in {mapping}")
        if not 1 <= category <= num_classes:
            raise _row_error(
                path, i, f"category_id {category} is not a class id 1..{num_classes} (see --classes)"
            )
        if not math.isfinite(score):
            raise _row_error(path, i, f"score {row['score']!r} is not finite")
        entry = entries[index[image_id]]
        per_image[index[image_id]].append((category, score, _mask(row, entry, path, i)))
    return [_instances(e, found) for e, found in zip(entries, per_image, strict=True)]


def _instances(entry: TestEntry, found: list[tuple[int, float, np.ndarray]]) -> Instances:
    offsets, crops = [], []
    for _, _, mask in found:
        # an empty mask: a one-pixel empty crop keeps its row (it can only miss)
        offset, crop = crop_to_box(mask) or ((0, 0), np.zeros((1, 1), bool))
        offsets.append(offset)
        crops.append(crop)
    n = len(found)
    return Instances(
        entry.height,
        entry.width,
        labels=np.asarray([c for c, _, _ in found], np.int64).reshape(n),
        scores=np.asarray([s for _, s, _ in found], np.float32).reshape(n),
        offsets=np.asarray(offsets, np.int64).reshape(n, 2),
        crops=crops,
    )


# -------------------------------------------------------------------------------------------------- scoring
@dataclass(frozen=True)
class Report:
    """Every figure of a scored results file: the flat ``metrics`` and the nuclei scores behind them."""

    metrics: dict
    nuclei: SplitScores
    missing_truth: list[str]


def score_results(
    results: str | Path,
    truth_dir: str | Path,
    mapping: str | Path,
    score_threshold: float | tuple[float, ...] = DEFAULT_SCORE_THRESHOLD,
    min_kept_fraction: float = DEFAULT_MIN_KEPT_FRACTION,
    classes: tuple[str, ...] = DEFAULT_CLASSES,
) -> Report:
    """Read, check and score ``results`` against ``truth_dir`` (see the module docstring); ``classes``: the class
    names, class 1 first (their number is K)."""
    results, mapping = Path(results), Path(mapping)
    k_classes = len(classes)
    if isinstance(score_threshold, tuple) and len(score_threshold) != k_classes:
        raise ResultsError(f"{len(score_threshold)} per-class score thresholds for {k_classes} classes")
    entries = read_test_mapping(mapping)
    rows = read_results(results)
    predictions = results_to_instances(rows, entries, results, mapping, k_classes)
    truths, missing = read_truth(truth_dir, entries, k_classes)
    names = [Path(e.file_name).stem for e in entries]
    # a dense cap above every image's count, so that per-class AP50 drops nothing; the totals are at 100
    dense = max([LEADERBOARD_MAX_DETECTIONS + 1] + [len(p) + 1 for p in predictions])
    coco = evaluate(truths, predictions, max_detections=dense, num_classes=k_classes).metrics
    rule = NucleusRule(score_threshold, min_kept_fraction)
    nuclei = score_split(names, truths, predictions, rule, k_classes)
    metrics = {
        "ap50_at_100": coco["map_50_at_100"],
        "ap": coco["map_at_100"],
        **nuclei.metrics,
        "score_threshold": list(score_threshold) if isinstance(score_threshold, tuple) else score_threshold,
        "min_kept_fraction": min_kept_fraction,
        "n_images": len(entries),
        "n_images_without_truth_folder": len(missing),
        "n_true": coco["n_ground_truth"],
        "n_pred": coco["n_predictions"],
        "per_class": {},
    }
    for k, (name, c) in enumerate(zip(classes, nuclei.class_counts(), strict=True), start=1):
        figures = {key: (-1.0 if v is None else v) for key, v in c.figures().items() if key in _CLASS_FIGURES}
        metrics["per_class"][name] = {
            "ap50": coco[f"ap50_{class_key(k)}"],
            **figures,
            "n_true": c.n_true,
            "n_pred": c.n_pred,
        }
    return Report(metrics, nuclei, missing)


_CLASS_FIGURES = ("pq", "dq", "sq", "precision", "recall", "f1", "aji", "aji_plus", "dice2")
"""Per class, every count pooled over the split (mPQ⁺'s way): AJI and DICE2 are then Σ inter / Σ union etc."""


def _thresholds_text(value) -> str:
    return (
        f"{value:g}" if isinstance(value, int | float) else "per class " + "/".join(f"{v:g}" for v in value)
    )


def thresholds_from_file(path: Path, num_classes: int) -> float | tuple[float, ...]:
    """The label-score threshold(s) a tune stage's ``thresholds.json`` gives label maps (of ``num_classes``
    classes)."""
    from cellseg.model.thresholds import PER_CLASS_KEY, _per_class, _read_thresholds

    stored = _read_thresholds(path)
    try:
        value = float(stored["label_score_threshold"])
        if PER_CLASS_KEY in stored:
            return tuple(_per_class(stored[PER_CLASS_KEY], value, num_classes))
    except (KeyError, TypeError, ValueError) as err:
        raise ResultsError(f"{path}: not a thresholds file ({err})") from None
    return value


def format_table(metrics: dict) -> str:
    """A readable table: one row per class (pooled over the split: mPQ⁺'s terms) and the split's figures."""

    def fmt(value) -> str:
        return "   n/a" if value is None or value < 0 else f"{value:6.3f}"

    width = max([8, *(len(name) for name in metrics["per_class"])])
    header = f"{'':{width}} {'AP50':>6} {'PQ':>6} {'DQ':>6} {'SQ':>6} {'prec':>6} {'recall':>6} {'F1':>6} {'n_true':>7} {'n_pred':>7}"
    lines = [
        f"{metrics['n_images']} images ({metrics['n_images_without_truth_folder']} without truth folder), "
        f"{metrics['n_true']} true nuclei, {metrics['n_pred']} predictions; "
        f"label maps at score >= {_thresholds_text(metrics['score_threshold'])}",
        header,
    ]
    for name, c in metrics["per_class"].items():
        lines.append(
            f"{name:{width}} {fmt(c['ap50'])} {fmt(c['pq'])} {fmt(c['dq'])} {fmt(c['sq'])} {fmt(c['precision'])} "
            f"{fmt(c['recall'])} {fmt(c['f1'])} {c['n_true']:7d} {c['n_pred']:7d}"
        )
    m = metrics
    lines += [
        f"AP50@100 {fmt(m['ap50_at_100'])}   AP@100 {fmt(m['ap'])}   mPQ+ {fmt(m['mpq_plus'])}",
        f"PQ {fmt(m['pq'])}   DQ {fmt(m['dq'])}   SQ {fmt(m['sq'])}   (mean over images with truth or prediction)",
        f"AJI {fmt(m['aji'])}   AJI+ {fmt(m['aji_plus'])}   DICE2 {fmt(m['dice2'])}   "
        f"precision {fmt(m['precision'])}   recall {fmt(m['recall'])}   F1 {fmt(m['f1'])}",
    ]
    return "\n".join(lines)


def write_per_image(path: str | Path, nuclei: SplitScores) -> None:
    """Per-image figures: JSON (a list of objects) when ``path`` ends in ``.json``, else CSV."""
    path, rows = Path(path), nuclei.per_image_rows()
    path.write_text(
        json.dumps(rows, indent=1) + "\n" if path.suffix.lower() == ".json" else per_image_csv(rows)
    )


def score_classes(option: str | None, params_file: Path = Path("params.yaml")) -> tuple[str, ...]:
    """The classes to score: ``--classes`` (comma-separated), else ``classes`` of ``params_file`` where it
    exists, else :data:`cellseg.DEFAULT_CLASSES`."""
    from cellseg.params import check_classes, load_params

    if option is not None:
        return check_classes([name.strip() for name in option.split(",")], "--classes")
    if params_file.is_file():
        return tuple(load_params(params_file).classes)
    return DEFAULT_CLASSES


def main(argv: list[str] | None = None, prog: str = "cellseg score") -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument(
        "results", type=Path, help="COCO results JSON, or a submission.zip holding test-results.json"
    )
    parser.add_argument(
        "truth_dir", type=Path, help="<stem>/class1..K.tif folders (test_truth/ or a raw train/)"
    )
    parser.add_argument(
        "mapping", type=Path, help="test_image_name_to_ids.json: file_name, id, height, width"
    )
    parser.add_argument(
        "--score-threshold",
        type=float,
        default=DEFAULT_SCORE_THRESHOLD,
        help=f"results below it are left out of the label maps of PQ, AJI, F1 (default {DEFAULT_SCORE_THRESHOLD})",
    )
    parser.add_argument(
        "--thresholds",
        type=Path,
        metavar="JSON",
        help="the tune stage's models/thresholds.json: its label-score threshold(s), per class where tuned "
        "per class, instead of --score-threshold",
    )
    parser.add_argument(
        "--min-kept-fraction",
        type=float,
        default=DEFAULT_MIN_KEPT_FRACTION,
        help="drop a predicted nucleus that keeps less than this share of its mask once overlaps are resolved "
        f"(default {DEFAULT_MIN_KEPT_FRACTION})",
    )
    parser.add_argument(
        "--classes",
        metavar="NAMES",
        help="the class names, comma-separated, class 1 first (K = their number; default: `classes` of "
        "./params.yaml where there is one, else class1,class2,class3,class4)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument(
        "--per-image", type=Path, metavar="FILE", help="write per-image figures (.json, else CSV)"
    )
    args = parser.parse_args(argv)
    if not 0.0 <= args.min_kept_fraction <= 1.0:
        raise ResultsError(f"--min-kept-fraction must be within [0, 1], got {args.min_kept_fraction}")
    classes = score_classes(args.classes)
    threshold = (
        thresholds_from_file(args.thresholds, len(classes)) if args.thresholds else args.score_threshold
    )
    report = score_results(
        args.results, args.truth_dir, args.mapping, threshold, args.min_kept_fraction, classes
    )
    if args.per_image:
        write_per_image(args.per_image, report.nuclei)
    print(json.dumps(report.metrics, indent=1) if args.json else format_table(report.metrics))
    sys.stdout.flush()


if __name__ == "__main__":
    from cellseg.entry import run

    run(main)
