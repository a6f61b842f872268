"""Stage `prepare`: raw tifs -> data/prepared/{train,val,test}/*.npz, the split file and metrics/data.json.

Usage: python stages/prepare.py <raw_dir> <prepared_dir> <split.json> <data.json>
"""

import argparse
import json

from cellseg.data.prepare import prepare_dataset
from cellseg.entry import run
from cellseg.params import load_params


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw_dir")
    parser.add_argument("prepared_dir")
    parser.add_argument("split_file")
    parser.add_argument("summary_file")
    args = parser.parse_args(argv)
    params = load_params()
    summary = prepare_dataset(
        args.raw_dir, args.prepared_dir, args.split_file, args.summary_file, params.data, params.classes
    )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    run(main)
