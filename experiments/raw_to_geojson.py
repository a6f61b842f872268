"""Write each training sample of a raw dataset as a pathologist's QuPath export: ``OUT/<sample>.geojson`` (its
nuclei as hand-drawn polygons, classified ``class1``..``classK``), for the import check of issue 27: a model
trained from these, imported, must score like one trained from the tifs.

  usage: python experiments/raw_to_geojson.py RAW OUT [--classes K]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cellseg.data.io import list_train_samples, read_train_sample
from cellseg.instances import Instances
from cellseg.slide.synthetic import write_annotation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--classes", type=int, default=4)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = tuple(f"class{k}" for k in range(1, args.classes + 1))
    samples = list_train_samples(args.raw, args.classes)
    for sample in samples:
        _, labels = read_train_sample(sample)
        write_annotation(
            args.out / f"{sample.name}.geojson", Instances.from_label_rows(labels), (0, 0), names
        )
    print(f"wrote {len(samples)} annotation files to {args.out}")


if __name__ == "__main__":
    main()
