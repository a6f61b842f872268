"""The out-of-domain figures (``metrics/ood.json``) from per-image counts: apart from the scoring, so that
gathering the sets' results runs no model, import or inference code.

Figures per set and pooled over sets: PQ, DQ, SQ, AJI and F1 from counts pooled over the nuclei (each image
weighs by its nuclei, so a set is not ruled by its emptiest tiles), the nuclei found vs true, and the worst
image with at least :data:`MIN_NUCLEI` true nuclei.
"""

from __future__ import annotations

from dataclasses import fields

from cellseg import CellsegError
from cellseg.eval.nuclei_metrics import Counts

MIN_NUCLEI = 50
"""The worst-image figure covers images with at least this many true nuclei (fewer make PQ a coin toss)."""
LOW_PQ = 0.30
"""``images_below`` counts the images of at least MIN_NUCLEI nuclei whose PQ is below this."""
FIGURES = ("pq", "dq", "sq", "aji", "f1", "precision", "recall")


class OodError(CellsegError, ValueError):
    """An out-of-domain set that cannot be scored; the message names the set and the file."""


def figures(counts: Counts) -> dict:
    """``counts.figures()`` of :data:`FIGURES`, rounded, undefined as -1 (JSON metrics)."""
    out = counts.figures()
    return {key: -1.0 if out[key] is None else round(float(out[key]), 6) for key in FIGURES}


def set_summary(rows: list[dict]) -> dict:
    """A set's (or all sets') figures from its per-image rows (each holding its :class:`Counts` fields)."""
    names = [f.name for f in fields(Counts)]
    pooled = sum((Counts(**{k: row[k] for k in names}) for row in rows), Counts())
    big = [row["pq"] for row in rows if row["n_true"] >= MIN_NUCLEI]
    return {
        **figures(pooled),
        "n_true": pooled.n_true,
        "n_found": pooled.n_pred,
        "n_images": len(rows),
        f"worst_pq_{MIN_NUCLEI}plus": round(min(big), 6) if big else -1.0,
        f"images_{MIN_NUCLEI}plus": len(big),
        f"images_{MIN_NUCLEI}plus_below_{LOW_PQ:.2f}": sum(pq < LOW_PQ for pq in big),
    }


def summarise_sets(results: dict[str, dict]) -> dict:
    """``metrics/ood.json``: every set's summary and, under ``pooled``, all their images together."""
    out = {name: result["summary"] for name, result in results.items()}
    out["pooled"] = set_summary([row for result in results.values() for row in result["images"]])
    return out
