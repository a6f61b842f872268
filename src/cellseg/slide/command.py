"""``cellseg slide CHECKPOINT SLIDE... --out DIR``: nuclei of whole slides, for QuPath and for tables.

Per slide, ``DIR/<slide stem>/`` gets the output formats of ``slide.outputs`` (or ``--format``: by default
``nuclei.geojson`` and ``nuclei.csv``), ``thumbnail.png``, ``tissue.png`` and ``provenance.json``, and one summary
line is printed. The nuclei are the model's (:mod:`cellseg.nuclei`, with the tuned thresholds next to the
checkpoint, ``thresholds.json``, when there are some): the same as ``cellseg predict`` gives for the same pixels.
Settings: ``slide.*`` and ``predict.*`` of params.yaml.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from cellseg import CellsegError
from cellseg.params import load_params


def main(argv: list[str] | None = None, prog: str = "cellseg slide") -> None:
    from cellseg.outputs import FORMATS, check_formats, formats_for

    slide_formats = formats_for("slide")
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
        "--format",
        dest="formats",
        metavar="NAME[,NAME...]",
        help="output formats instead of slide.outputs: "
        + "; ".join(f"{name} ({FORMATS[name].help})" for name in slide_formats),
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
    from cellseg.model.bundle import BESIDE, open_model
    from cellseg.params import as_dict
    from cellseg.slide.run import SlideRequest, dask_client, run_slide, slide_stem

    params = load_params()
    settings = params.slide
    if args.formats is not None:
        settings = dataclasses.replace(
            settings, outputs=[f.strip() for f in args.formats.split(",") if f.strip()]
        )
    check_formats(settings.outputs, "slide", "--format" if args.formats is not None else "slide.outputs")
    device = select_device(params.predict.device, "predict.device")
    model = open_model(args.checkpoint, params, device, args.thresholds or BESIDE)  # checked before any slide
    if not model.records_mpp:
        print(
            f"warning: {args.checkpoint} does not record its training resolution (data.mpp); assuming "
            f"params.yaml's {model.mpp} µm/px",
            file=sys.stderr,
        )
    record = model.provenance(postproc=False, slide=as_dict(settings))  # slides use no map-guided steps
    stems = {}
    for slide in args.slides:
        stem = slide_stem(slide)
        if stem in stems:
            raise CellsegError(f"{slide} and {stems[stem]} would both be written to {args.out / stem}/")
        stems[stem] = slide

    def run_all(client=None) -> None:
        for slide in args.slides:
            request = SlideRequest(
                Path(slide), Path(args.checkpoint), args.out, model.mpp, model.predict, settings,
                mpp=args.mpp, workers=args.workers, scheduler=args.scheduler, device=str(device),
                record=record, class_names=model.class_names,
            )  # fmt: skip
            summary = run_slide(request, client, progress=not args.no_progress)
            print(summary.line(), flush=True)

    if args.scheduler or args.workers > 1:
        with dask_client(args.workers, args.scheduler) as client:
            run_all(client)
    else:
        run_all()
