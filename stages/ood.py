"""Stage `ood@<set>`: the best checkpoint on one out-of-domain set of `evaluate.ood`, class-agnostic.

The set's images are imported at the model's µm/px (as `cellseg import` would), predicted with the tuned
thresholds and scored; the per-image rows and the set's summary go to one JSON file, which the `ood_summary`
stage gathers into metrics/ood.json (cellseg.ood.score).

Usage: python stages/ood.py <set> <checkpoint> <thresholds_json> <out_json> <overlays_dir>
"""

import argparse
from pathlib import Path

from cellseg.device import select_device
from cellseg.entry import run
from cellseg.eval.ood_metrics import OodError
from cellseg.fsutil import atomic_dir, write_json
from cellseg.model.bundle import open_model
from cellseg.ood.score import score_set
from cellseg.params import load_params, replace


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("set", help="a name of evaluate.ood in params.yaml")
    parser.add_argument("checkpoint", type=Path, help="models/best.pt of the train stage")
    parser.add_argument("thresholds", type=Path, help="models/thresholds.json of the tune stage")
    parser.add_argument("out_json", type=Path, help="written: the set's summary and per-image rows")
    parser.add_argument("overlays", type=Path, help="written: truth | nuclei | outcome of the worst images")
    args = parser.parse_args(argv)
    params = load_params()
    if args.set not in params.evaluate.ood:
        raise OodError(
            f"evaluate.ood has no set {args.set!r} (it has {', '.join(params.evaluate.ood) or 'none'})"
        )
    device = select_device(params.predict.device, "predict.device")
    model = open_model(args.checkpoint, params, device, args.thresholds)
    params = replace(params, predict=model.predict, postproc=model.postproc)
    with atomic_dir(args.overlays) as overlays:
        result = score_set(args.set, params.evaluate.ood[args.set], model, params, device, False, overlays)
    write_json(args.out_json, result)
    s = result["summary"]
    print(
        f"ood {args.set}: PQ {s['pq']:.3f} (DQ {s['dq']:.3f}, SQ {s['sq']:.3f}), AJI {s['aji']:.3f}, "
        f"F1 {s['f1']:.3f}; {s['n_found']} nuclei found, {s['n_true']} true, in {s['n_images']} images"
    )


if __name__ == "__main__":
    run(main)
