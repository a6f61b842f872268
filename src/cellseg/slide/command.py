"""``cellseg slide CHECKPOINT SLIDE... --out DIR``: nuclei of whole slides, for QuPath and for tables.

Per slide, ``DIR/<slide stem>/`` gets ``nuclei.geojson`` (or ``.geojson.gz``), ``nuclei.csv`` (or ``.parquet``),
``thumbnail.png`` and ``tissue.png``, and one summary line is printed. Settings: ``slide.*`` and ``predict.*`` of
params.yaml, the tuned thresholds next to the checkpoint (``thresholds.json``) when there are some.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cellseg import CellsegError
from cellseg.params import load_params


def training_mpp(state: dict, fallback: float, checkpoint: str) -> float:
    """The resolution the checkpoint was trained at (``data.mpp`` saved with it); ``fallback`` (params.yaml)
    for a checkpoint older than the setting, with a warning."""
    mpp = state.get("params", {}).get("data", {}).get("mpp")
    if mpp is None:
        print(
            f"warning: {checkpoint} does not record its training resolution (data.mpp); assuming params.yaml's "
            f"{fallback} µm/px",
            file=sys.stderr,
        )
        return float(fallback)
    return float(mpp)


def main(argv: list[str] | None = None, prog: str = "cellseg slide") -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="e.g. models/best.pt")
    parser.add_argument(
        "slides", nargs="+", metavar="SLIDE", help="slide files (svs, tif, ome.tif, ndpi, png, jpg...)"
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder: <slide stem>/ per slide")
    parser.add_argument(
        "--mpp", type=float, help="level-0 resolution in µm/px, for slides without it (overrides)"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="local Dask worker processes (1: in this process)"
    )
    parser.add_argument(
        "--scheduler",
        help="address of an existing Dask scheduler (e.g. tcp://host:8786) instead of local workers",
    )
    parser.add_argument(
        "--thresholds", type=Path, help="tuned thresholds (default: thresholds.json beside the checkpoint)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.workers < 1:
        raise CellsegError(f"--workers must be >= 1; got {args.workers}")

    from cellseg.device import select_device
    from cellseg.infer.thresholds import THRESHOLDS_FILE, tuned_predict_params
    from cellseg.model.checkpoint import load_trained_model
    from cellseg.params import as_dict
    from cellseg.provenance import provenance
    from cellseg.slide.run import dask_client, run_slide, slide_stem

    params = load_params()
    device = select_device(params.predict.device, "predict.device")
    _, state = load_trained_model(args.checkpoint, device)  # checks the checkpoint before any slide work
    target = training_mpp(state, params.data.mpp, args.checkpoint)
    thresholds = args.thresholds
    if thresholds is None and (Path(args.checkpoint).parent / THRESHOLDS_FILE).is_file():
        thresholds = Path(args.checkpoint).parent / THRESHOLDS_FILE
    predict = tuned_predict_params(params.predict, thresholds)
    record = {
        **provenance(args.checkpoint, state),
        "thresholds": str(thresholds) if thresholds else None,
        "predict": as_dict(predict),
        "slide": as_dict(params.slide),
    }
    stems = {}
    for slide in args.slides:
        stem = slide_stem(slide)
        if stem in stems:
            raise CellsegError(f"{slide} and {stems[stem]} would both be written to {args.out / stem}/")
        stems[stem] = slide

    def run_all(client=None) -> None:
        for slide in args.slides:
            summary = run_slide(
                slide,
                args.checkpoint,
                args.out,
                target,
                predict,
                params.slide,
                mpp=args.mpp,
                workers=args.workers,
                scheduler=args.scheduler,
                device=str(device),
                client=client,
                progress=not args.no_progress,
                record=record,
            )
            print(summary.line(), flush=True)

    if args.scheduler or args.workers > 1:
        with dask_client(args.workers, args.scheduler) as client:
            run_all(client)
    else:
        run_all()
