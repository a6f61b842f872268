"""Stage `train`: Mask R-CNN (+ optional centre/boundary heads) on data/prepared and data/maps.

Usage: python stages/train.py <prepared_dir> <maps_dir> <models_dir> <live_dir>
Distributed: torchrun --nproc_per_node=N stages/train.py ... (only rank 0 writes).
"""

import argparse
from pathlib import Path

from cellseg.cli import run
from cellseg.params import load_params
from cellseg.train import TrainPaths, train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("prepared_dir", "maps_dir", "models_dir", "live_dir"):
        parser.add_argument(name, type=Path)
    args = parser.parse_args(argv)
    train(load_params(), TrainPaths(args.prepared_dir, args.maps_dir, args.models_dir, args.live_dir))


if __name__ == "__main__":
    run(main)
