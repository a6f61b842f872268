"""The budget curve: test PQ, mPQ⁺ and AP50@100 against the minutes of `make real-cpu BUDGET=M`.

    python experiments/plot_budget.py OUT [--png docs/budget_curve.png]

reads ``OUT/budgetM…/test.json`` (``cellseg score``'s figures on the held-out truth) and ``summary.json`` (the
plan) of each run of ``experiments/real_cpu_budget.sh`` (``budgetM-seedS``) and prints a Markdown table; with
``--png``, draws the figures against the budget (the mean where a budget has several seeds).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--png", type=Path)
    args = parser.parse_args()
    rows = []
    walls = {}
    summary_log = args.out / "summary.log"
    if summary_log.is_file():
        for line in summary_log.read_text().splitlines():
            found = re.match(r"(budget\S+) rc=0 wall=(\d+)s", line)
            if found:
                walls[found.group(1)] = int(found.group(2)) / 60
    for folder in args.out.glob("budget*"):
        budget = re.match(r"budget(\d+)", folder.name)
        if budget is None or not (folder / "test.json").is_file():
            continue
        test = json.loads((folder / "test.json").read_text())
        plan = json.loads((folder / "summary.json").read_text())["budget"]
        rows.append((int(budget.group(1)), folder.name, walls.get(folder.name), plan, test))
    rows.sort()
    print("| run | wall | steps (epochs) | isa | AP50@100 | PQ | mPQ⁺ | AJI | F1 | PQ class 1 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for _, name, wall, plan, test in rows:
        print(
            f"| {name} | {wall:.1f} min | {plan['achieved_steps']} ({plan['achieved_epochs']:g}) | "
            f"{plan['plan']['isa']} | {test['ap50_at_100']:.3f} | {test['pq']:.3f} | {test['mpq_plus']:.3f} | "
            f"{test['aji']:.3f} | {test['f1']:.3f} | {test['per_class']['class1']['pq']:.3f} |"
        )
    if args.png and rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
        minutes = sorted({r[0] for r in rows})
        for key, label in (("pq", "PQ"), ("mpq_plus", "mPQ⁺"), ("ap50_at_100", "AP50@100")):
            means = [
                sum(r[4][key] for r in rows if r[0] == m) / sum(r[0] == m for r in rows) for m in minutes
            ]
            ax.plot(minutes, means, marker="o", label=label)
            ax.scatter([r[0] for r in rows], [r[4][key] for r in rows], s=8, color="grey")
        ax.set_xlabel("budget of the whole run (minutes)")
        ax.set_ylabel("consep-dev test")
        ax.set_xticks(minutes)
        ax.grid(alpha=0.3)
        ax.legend()
        seeds = max(sum(r[0] == m for r in rows) for m in minutes)
        ax.set_title(f"make real-cpu BUDGET=M ({rows[0][3]['plan']['isa']}, up to {seeds} seeds)", fontsize=9)
        fig.tight_layout()
        fig.savefig(args.png)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
