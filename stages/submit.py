"""Stage `submit`: the checkpoint predicts every prepared test image -> test-results.json and submission.zip.

provenance.json beside them records the checkpoint's sha256, its training params, the cellseg version and the
inference settings (``ModelBundle.provenance``).

The model opens with the tune stage's thresholds file (``cellseg.model.bundle``), which gives the mask and
centre-peak thresholds; COCO results keep every detection above ``predict.score_threshold``.

Usage: python stages/submit.py <checkpoint> <thresholds_json> <prepared_test_dir> <out_dir>
"""

import argparse
import json

from cellseg.device import select_device
from cellseg.entry import run
from cellseg.infer.submit import submit
from cellseg.model.bundle import open_model
from cellseg.params import load_params


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="models/best.pt")
    parser.add_argument(
        "thresholds", help="models/thresholds.json of the tune stage (its mask and peak thresholds)"
    )
    parser.add_argument("test_dir", help="prepared test images: <name>.npz with 'image' and 'image_id'")
    parser.add_argument("out_dir", help="written: test-results.json, submission.zip and provenance.json")
    args = parser.parse_args(argv)
    params = load_params()
    device = select_device(params.predict.device, "predict.device")
    model = open_model(args.checkpoint, params, device, args.thresholds)
    summary = submit(
        model.network, args.test_dir, args.out_dir, model.predict, device, model.postproc, model.provenance()
    )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    run(main)
