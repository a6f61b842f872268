"""Stage `tune`: score, mask and centre-peak thresholds chosen by validation PQ -> models/thresholds.json.

The peak threshold is tuned only with a map-guided step on (``postproc.*``) and a model with heads; otherwise
the file holds ``postproc.peak_threshold`` (``cellseg.eval.tune``).

Usage: python stages/tune.py <checkpoint> <val_dir> <thresholds_json>
"""

import argparse
import json
from pathlib import Path

from cellseg.data.io import list_samples
from cellseg.device import select_device
from cellseg.entry import run
from cellseg.eval.tune import tune_thresholds
from cellseg.fsutil import write_json
from cellseg.model.bundle import open_model
from cellseg.params import load_params


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="models/best.pt of the train stage")
    parser.add_argument("val_dir", type=Path, help="prepared validation samples, <sample>.npz")
    parser.add_argument("thresholds_json", type=Path, help="written: the tuned thresholds")
    args = parser.parse_args(argv)
    params = load_params()
    device = select_device(params.predict.device, "predict.device")
    model = open_model(args.checkpoint, params, device, thresholds=None)  # params.yaml's: it tunes them
    files = list_samples(args.val_dir)
    thresholds = tune_thresholds(
        model.network, files, model.predict, params.tune, device, model.num_classes, model.postproc
    )
    write_json(args.thresholds_json, thresholds)
    print(json.dumps({k: v for k, v in thresholds.items() if k != "tried"}, indent=2))


if __name__ == "__main__":
    run(main)
