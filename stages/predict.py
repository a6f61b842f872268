"""Predict any folder of images: the same as ``cellseg predict`` (kept for the commands people already use).

Usage: python stages/predict.py <checkpoint> <image_folder> <out_dir> [--maps png|npz]
"""

from cellseg.entry import run
from cellseg.infer.folder import main

if __name__ == "__main__":
    run(lambda: main(prog="python stages/predict.py"))
