"""Stage `maps`: prepared samples -> centre heatmap and boundary map per sample, plus preview PNGs.

Usage: python stages/maps.py <prepared_dir> <maps_dir> <previews_dir>
"""

import argparse

from cellseg.data.maps import write_maps
from cellseg.entry import run
from cellseg.params import load_params


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prepared_dir", help="holds train/ and val/ with <sample>.npz (image, labels)")
    parser.add_argument("maps_dir", help="written: train/ and val/ with <sample>.npz (center, boundary)")
    parser.add_argument("previews_dir", help="written: image | centre | boundary PNGs of the first samples")
    args = parser.parse_args(argv)
    params = load_params()
    count = write_maps(args.prepared_dir, args.maps_dir, args.previews_dir, params.maps)
    print(f"maps: {count} samples -> {args.maps_dir}, previews -> {args.previews_dir}")


if __name__ == "__main__":
    run(main)
