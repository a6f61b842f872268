"""``cellseg <verb>``: the command line of everything that runs outside the DVC pipeline.

Each verb lives in the module that does the work and is imported only when called, so ``cellseg --help`` is
instant and a verb's dependencies load only for it. The pipeline's stages stay ``dvc repro`` (``stages/*.py``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cellseg import __version__
from cellseg.entry import run

VERBS = {
    "score": (
        "cellseg.eval.score_results",
        "score a COCO results file or submission.zip against a truth folder",
    ),
    "predict": ("cellseg.infer.folder", "predict a folder of images into per-class instance label maps"),
    "slide": (
        "cellseg.slide.command",
        "predict whole slides into QuPath GeoJSON, a nuclei table and pictures",
    ),
    "import": (
        "cellseg.importer.command",
        "import images or slides with QuPath/ImageScope annotations for training",
    ),
    "bench": ("cellseg.bench.runner", "run the benchmarks (all, or those named); each prints its ratio last"),
}
"""verb -> (module with ``main(argv, prog)``, one line of help)."""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="cellseg",
        description="Nuclei instance segmentation: prediction, scoring and benchmarks outside `dvc repro`.",
        epilog="`cellseg <verb> --help` describes a verb. The pipeline itself runs with `dvc repro`.",
    )
    parser.add_argument("--version", action="version", version=f"cellseg {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="<verb>", required=True)
    for verb, (_, summary) in VERBS.items():
        verbs.add_parser(verb, help=summary, add_help=False)
    if not argv or argv[0] not in VERBS:
        parser.parse_args(argv)  # --help, --version, or an error naming the valid verbs
        return
    module = importlib.import_module(VERBS[argv[0]][0])
    run(lambda: module.main(argv[1:], prog=f"cellseg {argv[0]}"))


if __name__ == "__main__":
    main()
