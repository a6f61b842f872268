"""Stage `ood_summary`: the out-of-domain sets' results gathered into metrics/ood.json (a DVC metric).

Each set of `evaluate.ood` (and only those: a file left by a set since removed is ignored) with its figures,
and `pooled`: all their images together (cellseg.eval.ood_metrics.summarise_sets).

Usage: python stages/ood_summary.py <results_dir> <metrics_json>
"""

import argparse
import json
from pathlib import Path

from cellseg.entry import run
from cellseg.eval.ood_metrics import OodError, summarise_sets
from cellseg.fsutil import write_json
from cellseg.params import load_params


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", type=Path, help="the ood stages' <set>.json files")
    parser.add_argument("metrics_json", type=Path, help="written: every set's figures and the pooled ones")
    args = parser.parse_args(argv)
    params = load_params()
    results = {}
    for name in params.evaluate.ood:
        path = args.results_dir / f"{name}.json"
        if not path.is_file():
            raise OodError(f"{path}: no result for evaluate.ood.{name} (run its stage: dvc repro ood@{name})")
        results[name] = json.loads(path.read_text())
    metrics = summarise_sets(results)
    write_json(args.metrics_json, metrics)
    p = metrics["pooled"]
    print(
        f"ood pooled over {len(results)} sets: PQ {p['pq']:.3f}, F1 {p['f1']:.3f}, {p['n_found']} found / {p['n_true']} true"
    )


if __name__ == "__main__":
    run(main)
