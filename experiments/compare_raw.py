"""Compare two raw datasets sample by sample (the tifs and their import): how many nuclei match one-to-one at
IoU > 0.5, how many masks are pixel-identical, and how many pixels differ in all.

  usage: python experiments/compare_raw.py RAW_A RAW_B   (samples of B named <sample of A>_0000)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from cellseg.data.io import list_train_samples, read_train_sample
from cellseg.instances import Instances


def main() -> None:
    a_dir, b_dir = map(Path, sys.argv[1:3])
    b_samples = {s.name: s for s in list_train_samples(b_dir, 4)}
    n_a = identical = matched = differing_pixels = total_pixels = 0
    for sample in list_train_samples(a_dir, 4):
        _, a = read_train_sample(sample)
        _, b = read_train_sample(b_samples[f"{sample.name}_0000"])
        differing_pixels += int(np.count_nonzero((a > 0) != (b > 0)))
        total_pixels += int(np.count_nonzero(a > 0))
        ia, ib = Instances.from_label_rows(a), Instances.from_label_rows(b)
        n_a += len(ia)
        masks_b = {}
        for k in range(4):
            for i in np.unique(b[k][b[k] > 0]):
                masks_b[(k, int(i))] = b[k] == i
        for k in range(4):
            for i in np.unique(a[k][a[k] > 0]):
                mask = a[k] == i
                hits = np.unique(b[k][mask])
                hits = hits[hits > 0]
                best = (
                    max(
                        (
                            np.count_nonzero(mask & masks_b[(k, int(j))])
                            / np.count_nonzero(mask | masks_b[(k, int(j))]),
                            int(j),
                        )
                        for j in hits
                    )
                    if len(hits)
                    else (0.0, 0)
                )
                matched += best[0] > 0.5
                identical += best[0] == 1.0
        del ia, ib
    print(
        f"nuclei in the tifs: {n_a}; matched in the import at IoU > 0.5: {matched} ({matched / n_a:.4f}); "
        f"pixel-identical: {identical} ({identical / n_a:.4f}); nucleus pixels differing: {differing_pixels} "
        f"of {total_pixels} ({differing_pixels / total_pixels:.5f})"
    )


if __name__ == "__main__":
    main()
