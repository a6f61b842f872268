"""``cellseg bench import``: nuclei per second, and peak memory at 10k against 100k nuclei (issue 27).

Each size is a synthetic slide (0.25 µm/px, nuclei on a grid, as dense as CoNSeP's densest tiles) with a QuPath
GeoJSON of its nuclei and one region around them, imported in a process of its own so that its peak RSS (VmHWM)
is its own. The GeoJSON is streamed (ijson), so the peak grows with the nuclei held (compact shapely polygons),
not with the file; the ratio of the largest to the smallest peak is printed last (limit 2.0), and beside it what
``json.load`` of the largest file alone peaks at, the baseline a non-streaming reader starts from.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cellseg import CellsegError

MPP = 0.25
PITCH = 12  # px between nuclei centres: about 7000 nuclei per Mpx at 0.25 µm/px (dense tissue)
NAMES = ("class1", "class2", "class3", "class4")


def _vmhwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_case(folder: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    """A slide holding ``n`` nuclei on a grid and its GeoJSON (one region, octagons of radius 3-5 px)."""
    from cellseg.slide.synthetic import write_slide

    rng = np.random.default_rng(seed)
    per_row = math.ceil(math.sqrt(n))
    side = per_row * PITCH + 2 * PITCH
    texture = rng.integers(150, 230, (side, side, 3), dtype=np.uint8)
    slide = write_slide(folder / f"n{n}.tif", side, side, MPP, [(0, 0, texture)], levels=1, tile=256)
    angles = np.linspace(0, 2 * np.pi, 9)[:-1]
    path = folder / f"n{n}.geojson"
    with open(path, "w") as f:
        region = [[[0, 0], [side, 0], [side, side], [0, side], [0, 0]]]
        f.write('{"type": "FeatureCollection", "features": [\n')
        f.write(json.dumps({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": region},
                            "properties": {"objectType": "annotation", "classification": {"name": "Region"}}}))  # fmt: skip
        for i in range(n):
            cy, cx = PITCH * (1.5 + i // per_row), PITCH * (1.5 + i % per_row)
            r = rng.uniform(3, 5)
            ring = [[round(cx + r * math.cos(a), 2), round(cy + r * math.sin(a), 2)] for a in angles]
            feature = {
                "type": "Feature",
                "id": f"n{i}",
                "geometry": {"type": "Polygon", "coordinates": [ring + ring[:1]]},
                "properties": {"objectType": "annotation", "classification": {"name": NAMES[i % 4]}},
            }
            f.write(",\n" + json.dumps(feature))
        f.write("\n]}\n")
    return slide, path


def _child_import(slide: str, annotation: str, out: str) -> None:
    from cellseg.importer.pairs import Source
    from cellseg.importer.run import import_sources
    from cellseg.params import load_params

    t0 = time.perf_counter()
    record = import_sources([Source(Path(slide), Path(annotation))], Path(out), load_params(), progress=False)
    nuclei = sum(s["nuclei"] for s in record["samples"])
    print(json.dumps({"rss": _vmhwm(), "seconds": time.perf_counter() - t0, "nuclei": nuclei,
                      "tiles": len(record["samples"])}))  # fmt: skip


def _child_json_load(annotation: str) -> None:
    with open(annotation) as f:
        json.load(f)
    print(json.dumps({"rss": _vmhwm()}))


def _child(*args: str) -> dict:
    run = subprocess.run(
        [sys.executable, "-m", "cellseg.bench.importer", *args], capture_output=True, text=True
    )
    if run.returncode != 0:
        raise CellsegError(f"bench import {args[0]} failed:\n{run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def bench(sizes: list[int], folder: Path) -> float:
    peaks = []
    for n in sizes:
        slide, annotation = write_case(folder, n)
        result = _child("--_import", str(slide), str(annotation), str(folder / f"raw{n}"))
        peaks.append(result["rss"])
        print(
            f"import: {n} nuclei ({annotation.stat().st_size / 2**20:.1f} MiB of GeoJSON) -> {result['nuclei']} "
            f"(one cut by a tile's edge counts in each) written in {result['tiles']} tiles, {result['seconds']:.1f} s ({result['nuclei'] / result['seconds']:.0f} "
            f"nuclei/s), peak RSS {result['rss'] / 2**20:.0f} MiB"
        )
    loaded = _child("--_json-load", str(annotation))
    print(f"import: json.load alone of the {sizes[-1]}-nuclei file peaks at {loaded['rss'] / 2**20:.0f} MiB")
    ratio = peaks[-1] / peaks[0]
    print(f"import: peak RSS {sizes[-1]} / {sizes[0]} nuclei = {ratio:.3f} (limit 2.0)")
    return ratio


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--_import":
        return _child_import(*argv[1:4])
    if argv and argv[0] == "--_json-load":
        return _child_json_load(argv[1])
    parser = argparse.ArgumentParser(prog="cellseg bench import", description=__doc__.splitlines()[0])
    parser.add_argument("--nuclei", type=int, nargs="+", default=[10_000, 100_000])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cellseg-bench-import-") as tmp:
        bench(sorted(args.nuclei), Path(tmp))


if __name__ == "__main__":
    main()
