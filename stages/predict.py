"""Predict any folder of images: <out>/<stem>/class1.tif..class4.tif, instance label maps as in the raw data.

Usage: python stages/predict.py <checkpoint> <image_folder> <out_dir> [--maps png|npz]
Reads the `predict` and `postproc` settings (and `train.device`) from params.yaml in the working directory; the
tune stage's thresholds file, when there is one, replaces their score, mask and centre-peak thresholds.
"""

import argparse
import dataclasses
import json
from pathlib import Path

from cellseg.device import select_device
from cellseg.entry import run
from cellseg.infer.folder import IMAGE_SUFFIXES, MAPS_FORMATS, predict_folder
from cellseg.infer.thresholds import THRESHOLDS_FILE, tuned_postproc_params, tuned_predict_params
from cellseg.model.checkpoint import load_trained_model
from cellseg.params import load_params
from cellseg.provenance import provenance


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="e.g. models/best.pt")
    parser.add_argument("image_folder", help=f"images to predict ({', '.join(IMAGE_SUFFIXES)})")
    parser.add_argument(
        "out_dir",
        help="written: <stem>/class{k}.tif per image (absent when no instance), and provenance.json (the "
        "checkpoint's sha256 and training params, the cellseg version, the settings, the images)",
    )
    parser.add_argument(
        "--thresholds",
        type=Path,
        help="tuned thresholds (default: thresholds.json next to the checkpoint, if there is one; "
        "otherwise predict.label_score_threshold, predict.mask_threshold and postproc.peak_threshold of "
        "params.yaml)",
    )
    parser.add_argument(
        "--maps",
        choices=MAPS_FORMATS,
        help="also write the centre and boundary probabilities: <stem>/{center,boundary}.png or <stem>/maps.npz",
    )
    args = parser.parse_args(argv)
    params = load_params()
    device = select_device(params.train.device)
    model, state = load_trained_model(args.checkpoint, device)
    thresholds = args.thresholds
    if thresholds is None and (Path(args.checkpoint).parent / THRESHOLDS_FILE).is_file():
        thresholds = Path(args.checkpoint).parent / THRESHOLDS_FILE
    predict = tuned_predict_params(params.predict, thresholds)
    postproc = tuned_postproc_params(params.postproc, thresholds)
    peaks = f", centre peaks > {postproc.peak_threshold}" if postproc.any_step else ""
    print(
        f"thresholds: score >= {predict.label_score_threshold}, mask > {predict.mask_threshold}{peaks} "
        f"({thresholds or 'params.yaml'})"
    )
    record = {
        **provenance(args.checkpoint, state),
        "thresholds": str(thresholds) if thresholds else None,
        "predict": dataclasses.asdict(predict),
        "postproc": dataclasses.asdict(postproc),
    }
    counts = predict_folder(
        model, args.image_folder, args.out_dir, predict, device, postproc, args.maps, record
    )
    print(json.dumps(counts, indent=2))


if __name__ == "__main__":
    run(main)
