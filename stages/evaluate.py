"""Stage `evaluate`: the best checkpoint on the validation split -> COCO predictions, metrics/eval.json, plots.

The model opens with the tune stage's thresholds file (``cellseg.model.bundle``): score, mask and centre-peak
thresholds.

Usage: python stages/evaluate.py <checkpoint> <thresholds_json> <val_dir> <predictions_dir> <metrics_json>
       <plots_dir> [<per_image_csv>] [--maps <maps_val_dir>]
"""

import argparse
from pathlib import Path

from cellseg.device import select_device
from cellseg.entry import run
from cellseg.eval.report import EvalPaths, evaluate_checkpoint, summary
from cellseg.model.bundle import open_model
from cellseg.params import load_params, replace


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="models/best.pt of the train stage")
    parser.add_argument(
        "thresholds",
        type=Path,
        help="models/thresholds.json of the tune stage (score, mask, peak thresholds)",
    )
    parser.add_argument("val_dir", type=Path, help="prepared validation samples, <sample>.npz")
    parser.add_argument("predictions_dir", type=Path, help="written: val-results.json, val-images.json")
    parser.add_argument("metrics_json", type=Path, help="written: the metrics (a DVC metric)")
    parser.add_argument(
        "plots_dir", type=Path, help="written: pr/class<k>.csv, confusion.csv, overlays/, maps/"
    )
    parser.add_argument(
        "per_image_csv",
        type=Path,
        nargs="?",
        help="written: per-sample PQ, AJI, F1 … (default: <metrics_json stem>_per_image.csv beside it)",
    )
    parser.add_argument(
        "--maps",
        type=Path,
        help="the maps stage's <sample>.npz of the split (data/maps/val): with a model with heads, "
        "plots_dir/maps/ shows the overlaid samples' predicted centre and boundary maps against them "
        "(without heads or --maps: maps/ stays empty)",
    )
    args = parser.parse_args(argv)
    params = load_params()
    device = select_device(params.predict.device, "predict.device")
    model = open_model(args.checkpoint, params, device, args.thresholds)
    params = replace(params, predict=model.predict, postproc=model.postproc)
    paths = EvalPaths(
        args.checkpoint,
        args.val_dir,
        args.predictions_dir,
        args.metrics_json,
        args.plots_dir,
        args.per_image_csv,
        args.maps,
    )
    print(summary(evaluate_checkpoint(paths, params, device, model), model.class_names))


if __name__ == "__main__":
    run(main)
