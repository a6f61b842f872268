"""Mean and spread over seeds of the ablation runs, as the markdown tables of ``experiments/consep-cpu.md``.

Reads what ``experiments/abl_run.sh`` and ``experiments/infer_variants.py`` left in one folder:
``<run>_s<seed>/test.json`` (the scorer's ``--json`` on the held-out truth, at the tuned label-score
threshold; ``test_thr05.json``: at 0.5), ``<run>/metrics/train/plots``
(the per-epoch training curves) and ``variants_*.json``. Runs are grouped by their name without ``_s<seed>``.

Usage: python experiments/summarize_ablation.py /path/to/ablation/folder
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

FIGURES = ("ap50_at_100", "ap", "pq", "mpq_plus", "aji", "f1")
SEED = re.compile(r"^(?P<group>.+)_s(?P<seed>\d+)$")


def mean_spread(values: list[float]) -> str:
    """``mean ± sample std (n)``; one value alone is shown as it is."""
    if len(values) == 1:
        return f"{values[0]:.3f} (n=1)"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} (n={len(values)})"


def table(groups: dict[str, list[dict]], figures=FIGURES) -> str:
    lines = ["| variant | " + " | ".join(figures) + " |", "|---" * (len(figures) + 1) + "|"]
    for name, rows in groups.items():
        lines.append(f"| {name} | " + " | ".join(mean_spread([r[f] for r in rows]) for f in figures) + " |")
    return "\n".join(lines)


MASK_RCNN_LOSSES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


def detection_loss(run: Path) -> list[float] | None:
    """Mask R-CNN's own training loss per epoch (the heads' terms left out, so runs with and without heads
    compare), from the DVCLive curves; None when the run has none."""
    folder = run / "metrics" / "train" / "plots" / "metrics" / "train"
    curves = []
    for name in MASK_RCNN_LOSSES:
        path = folder / f"{name}.tsv"
        if not path.is_file():
            return None
        curves.append([float(line.split("\t")[1]) for line in path.read_text().splitlines()[1:]])
    return [sum(epoch) for epoch in zip(*curves, strict=True)]


def loss_jitter(losses: list[float], last: int = 4) -> float:
    """Std of the epoch-to-epoch changes of the loss over the last ``last`` epochs: a loss that falls
    steadily scores near 0, one that jumps up and down scores high."""
    steps = [b - a for a, b in zip(losses[-last:], losses[-last + 1 :], strict=False)]
    return statistics.pstdev(steps)


def main() -> None:
    folder = Path(sys.argv[1])
    groups: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(folder.glob("*/test.json")):
        name = path.parent.name
        match = SEED.match(name)
        groups[match["group"] if match else name].append(json.loads(path.read_text()))
    print("## Trained variants (test_release scored on test_truth)\n")
    print(table(dict(groups)))
    untuned: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(folder.glob("*/test_thr05.json")):
        match = SEED.match(path.parent.name)
        name = match["group"] if match else path.parent.name
        untuned[f"{name}: label score >= 0.5 (untuned)"].append(json.loads(path.read_text()))
    if untuned:
        print("\n## The same submissions at the untuned label-score threshold 0.5\n")
        print(table(dict(untuned), ("pq", "mpq_plus", "aji", "f1")))
    losses: dict[str, list[list[float]]] = defaultdict(list)
    for run in sorted(p for p in folder.iterdir() if p.is_dir()):
        curve = detection_loss(run)
        if curve is not None:
            match = SEED.match(run.name)
            losses[match["group"] if match else run.name].append(curve)
    if losses:
        print(
            "\n## Mask R-CNN training loss (heads' terms left out): last epoch, and jitter over the last 4\n"
        )
        print("| variant | final loss | jitter |\n|---|---|---|")
        for name, curves in losses.items():
            final = mean_spread([c[-1] for c in curves])
            print(f"| {name} | {final} | {mean_spread([loss_jitter(c) for c in curves])} |")
    variants: dict[str, list[dict]] = defaultdict(list)
    seen = set()  # a run's base rows appear in every file that re-predicted it: count each once
    for path in sorted(folder.glob("variants_*.json")):
        for row in json.loads(path.read_text()):
            if (row["run"], row["variant"]) in seen:
                continue
            seen.add((row["run"], row["variant"]))
            group = SEED.match(row["run"])
            variants[f"{group['group'] if group else row['run']}: {row['variant']}"].append(row)
    if variants:
        print("\n## Inference variants (one prediction pass per run; mean over the runs' seeds)\n")
        print(table(dict(variants)))


if __name__ == "__main__":
    main()
