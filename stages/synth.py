"""Stage `synth`: write the deterministic synthetic demo dataset in the raw layout (params.yaml `synth`).

Usage: python stages/synth.py <out_dir>
"""

import argparse
from functools import partial

from tqdm import tqdm

from cellseg.data.synth import write_dataset
from cellseg.entry import run
from cellseg.fsutil import atomic_dir
from cellseg.params import load_params


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    params = load_params()
    with atomic_dir(args.out_dir) as tmp:
        specs = write_dataset(tmp, params.synth, progress=partial(tqdm, desc="synth", unit="image"))
    print(f"wrote {len(specs)} images to {args.out_dir}")


if __name__ == "__main__":
    run(main)
