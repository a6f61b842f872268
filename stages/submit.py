"""Stage `submit`: the checkpoint predicts every prepared test image -> test-results.json and submission.zip.

provenance.json beside them records the checkpoint's sha256, its training params, the cellseg version and the
inference settings (``cellseg.provenance``).

The tune stage's thresholds file gives the mask and centre-peak thresholds (``cellseg.infer.thresholds``); COCO
results keep every detection above ``predict.score_threshold``.

Usage: python stages/submit.py <checkpoint> <thresholds_json> <prepared_test_dir> <out_dir>
"""

import argparse
import json

from cellseg.device import select_device
from cellseg.entry import run
from cellseg.infer.submit import submit
from cellseg.infer.thresholds import tuned_postproc_params, tuned_predict_params
from cellseg.model.checkpoint import load_trained_model
from cellseg.params import as_dict, load_params
from cellseg.provenance import provenance


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
    model, state = load_trained_model(args.checkpoint, device)
    predict = tuned_predict_params(params.predict, args.thresholds)
    postproc = tuned_postproc_params(params.postproc, args.thresholds)
    record = {
        **provenance(args.checkpoint, state),
        "thresholds": args.thresholds,
        "predict": as_dict(predict),
        "postproc": as_dict(postproc),
    }
    summary = submit(model, args.test_dir, args.out_dir, predict, device, postproc, record)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    run(main)
