"""Stage `train`: Mask R-CNN (+ optional centre/boundary heads) on data/prepared and data/maps.

Usage: python stages/train.py <prepared_dir> <maps_dir> <models_dir> <live_dir>
With train.nproc > 1 the stage launches itself under torchrun (one process per GPU), so `dvc repro` and
dvc.lock describe the multi-GPU run too. Only rank 0 writes.
"""

import argparse
import os
import sys
from pathlib import Path

from cellseg.device import select_device
from cellseg.entry import run
from cellseg.params import load_params
from cellseg.train.distributed import check_nproc, launch_torchrun
from cellseg.train.loop import TrainPaths, train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("prepared_dir", "maps_dir", "models_dir", "live_dir"):
        parser.add_argument(name, type=Path)
    args = parser.parse_args(argv)
    params = load_params()
    if params.train.nproc > 1 and "LOCAL_RANK" not in os.environ:
        check_nproc(params.train.nproc, select_device(params.train.device, "train.device"))
        launch_torchrun(params.train.nproc, [__file__, *(sys.argv[1:] if argv is None else argv)])
        return
    train(params, TrainPaths(args.prepared_dir, args.maps_dir, args.models_dir, args.live_dir))


if __name__ == "__main__":
    run(main)
