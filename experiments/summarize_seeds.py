"""Each seed's figures and their mean ± spread for ``experiments/real_cpu_seeds.sh``'s folder (issue 19's check).

Reads ``<out>/seed<N>/test.json`` (label maps at the tuned thresholds file: per class when the run tuned them,
``tune.class_score_grid``) and ``test_global.json`` (at
the one global threshold) and ``<out>/summary.log`` (wall time per seed), and prints markdown tables.

Usage: python experiments/summarize_seeds.py /path/to/results
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

FIGURES = (
    "ap50_at_100",
    "ap",
    "pq",
    "mpq_plus",
    "aji",
    "f1",
    "pq_class1",
    "pq_class2",
    "pq_class3",
    "pq_class4",
)


def main(folder: Path) -> None:
    walls = dict(re.findall(r"^(seed\d+) rc=0 wall=(\d+)s\b", (folder / "summary.log").read_text(), re.M))
    for kind, file in (("tuned thresholds file", "test.json"), ("global threshold", "test_global.json")):
        runs = {p.parent.name: json.loads(p.read_text()) for p in sorted(folder.glob(f"seed*/{file}"))}
        if not runs:
            continue
        print(f"\n{kind} ({file}):\n")
        print("| seed | wall | " + " | ".join(FIGURES) + " |")
        print("|---" * (len(FIGURES) + 2) + "|")
        for name, figures in runs.items():
            wall = f"{int(walls[name]) / 60:.1f} min" if name in walls else "?"
            print(f"| {name} | {wall} | " + " | ".join(f"{figures[f]:.3f}" for f in FIGURES) + " |")
        if len(runs) > 1:
            cells = []
            for f in FIGURES:
                values = [r[f] for r in runs.values()]
                cells.append(f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}")
            print("| mean ± std | | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
