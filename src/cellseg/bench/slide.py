"""Benchmark: whole slides (``cellseg slide``): memory, seams, workers and overhead; each prints its ratio last.

    python -m cellseg.bench.slide [--checkpoint models/best.pt] [--only memory seams workers overhead]
                                  [--sizes 4096 16384 32768] [--keep DIR]

- **memory**: synthetic pyramidal slides of 4k², 16k² and 32k² px (tiled, zlib, 0.25 µm/px, levels down to
  about 1k), each the same 1024² px of synthetic tissue on glass, each run in a fresh process (one worker, the
  synchronous path): peak RSS (VmHWM) of the largest against the smallest, at most 1.3×.
- **seams**: a 4×4 mosaic of annotated synthetic images (1024² px) predicted as a slide (blocks of one tile,
  so block seams cross every image) and image by image: nuclei matched one to one (IoU > 0.5), the unmatched
  counted on both sides, and PQ against the mosaic's truth of each; the ratio is |ΔPQ| (at most 0.005).
- **workers**: the mosaic with 1 and 2 workers: identical nuclei, throughput (tissue Mpx/s) of each; ratio =
  2-worker / 1-worker throughput.
- **overhead**: the mosaic's wall time (1 worker, model loaded) against the model's forward passes alone on the
  same tiles (pixels already in memory); ratio ≤ 1.25.

The model is ``make demo``'s (``models/best.pt``); ``predict.*`` and ``slide.*`` come from params.yaml with the
tuned thresholds beside the checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cellseg import CellsegError
from cellseg.slide.synthetic import tissue_mosaic

SIZES = (4096, 16384, 32768)
MPP = 0.25
TISSUE = 1024
MOSAIC = 4  # images per side, each 256 px


def _classes(checkpoint: Path) -> tuple[str, ...]:
    from cellseg.model.checkpoint import checkpoint_classes, read_checkpoint

    return checkpoint_classes(read_checkpoint(checkpoint), checkpoint)


def _settings(checkpoint: Path):
    """params.yaml, and its ``predict`` section with the model's tuned thresholds (the thresholds file beside
    the checkpoint, as ``cellseg slide`` reads it)."""
    from cellseg.model.thresholds import thresholds_beside, tuned_predict_params
    from cellseg.params import load_params

    params = load_params()
    return params, tuned_predict_params(
        params.predict, thresholds_beside(checkpoint), len(_classes(checkpoint))
    )


def _rule(predict):
    from cellseg.nuclei import NucleusRule

    return NucleusRule.of(predict)


def _vmhwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------------------------------- memory
def _memory_child(slide: str, checkpoint: str, out: str) -> None:
    params, predict = _settings(Path(checkpoint))
    t0 = time.perf_counter()
    summary = _run(slide, checkpoint, out, predict, params.slide, keep_work=False)
    print(json.dumps({"rss": _vmhwm(), "seconds": time.perf_counter() - t0, "blocks": summary.blocks,
                      "nuclei": sum(summary.counts.values())}))  # fmt: skip


def bench_memory(checkpoint: Path, sizes: list[int], folder: Path) -> float:
    from cellseg.slide.synthetic import write_slide

    tissue, _ = tissue_mosaic(TISSUE, 4)
    peaks = []
    for side in sizes:
        path = folder / f"slide{side}.tif"
        t0 = time.perf_counter()
        levels = max(1, int(np.log2(side / 1024)) + 1)
        write_slide(
            path, side, side, MPP, [(side // 2 - TISSUE // 2, side // 2 - TISSUE // 2, tissue)], levels, 512
        )
        written = time.perf_counter() - t0
        run = subprocess.run(
            [sys.executable, "-m", "cellseg.bench.slide", "--_memory-child", str(path), str(checkpoint), str(folder / "out")],
            capture_output=True, text=True,
        )  # fmt: skip
        if run.returncode != 0:
            raise CellsegError(f"memory run on {path.name} failed:\n{run.stderr[-2000:]}")
        result = json.loads(run.stdout.strip().splitlines()[-1])
        peaks.append(result["rss"])
        print(
            f"memory: {side}x{side} px slide ({path.stat().st_size / 2**20:.1f} MiB on disk, written in "
            f"{written:.1f} s): {result['blocks']} tissue blocks, {result['nuclei']} nuclei, "
            f"{result['seconds']:.1f} s, peak RSS {result['rss'] / 2**20:.0f} MiB"
        )
        path.unlink()
    ratio = peaks[-1] / peaks[0]
    print(f"memory: peak RSS {sizes[-1]}² / {sizes[0]}² = {ratio:.3f} (limit 1.3)")
    return ratio


# ------------------------------------------------------------------------------------- mosaic benchmarks
def _mosaic(folder: Path):
    from cellseg.slide.synthetic import write_slide

    image, truth = tissue_mosaic(TISSUE, MOSAIC)
    path = write_slide(folder / "mosaic.tif", TISSUE, TISSUE, MPP, [(0, 0, image)], levels=2, tile=256)
    return path, image, truth


def _slide_instances(summary, predict):
    """The nuclei a slide run wrote, from its kept block files (slide model pixels)."""
    from cellseg.slide.assemble import concat_instances, slide_nuclei

    chunks = slide_nuclei(summary.work, summary.grid, summary.tissue_blocks, summary.job, _rule(predict))
    return concat_instances(list(chunks), summary.job.height, summary.job.width)


def _match(a, b) -> tuple[int, int, int]:
    """One-to-one matches at mask IoU > 0.5 between two instance sets: ``(matched, only in a, only in b)``."""
    from cellseg.nuclei import NucleusRule, label_map

    la, lb = label_map(a, NucleusRule()).ids, label_map(b, NucleusRule()).ids
    both = (la > 0) & (lb > 0)
    pairs, inter = np.unique(np.stack([la[both], lb[both]]), axis=1, return_counts=True)
    area_a = np.bincount(la.ravel())
    area_b = np.bincount(lb.ravel())
    iou = inter / (area_a[pairs[0]] + area_b[pairs[1]] - inter)
    matched = int((iou > 0.5).sum())
    return matched, int(len(area_a) - 1 - matched), int(len(area_b) - 1 - matched)


def _run(path, checkpoint, out, predict, settings, workers=1, keep_work=True):
    """One slide run; its block files are kept (``summary.work``) to read its nuclei back."""
    from cellseg.slide.run import SlideRequest, SlideRunner

    class KeepWork(SlideRunner):
        pass

    KeepWork.keep_work = keep_work
    request = SlideRequest(Path(path), Path(checkpoint), Path(out), MPP, predict, settings, workers=workers)
    return KeepWork(request, progress=False).run()


def bench_seams(checkpoint: Path, folder: Path) -> float:
    import torch

    from cellseg.data.synth import SYNTH_CLASSES
    from cellseg.eval.nuclei_metrics import score_split
    from cellseg.infer.detect import detect_image
    from cellseg.nuclei import nuclei
    from cellseg.slide.assemble import concat_instances
    from cellseg.slide.run import _model

    params, predict = _settings(checkpoint)
    path, image, truth = _mosaic(folder)
    settings = dataclasses.replace(params.slide, block_tiles=1)
    summary = _run(path, checkpoint, folder / "seams", predict, settings)
    whole = _slide_instances(summary, predict)
    rule = _rule(predict)
    model = _model(str(checkpoint), "cpu")
    cell = TISSUE // MOSAIC
    parts = []
    with torch.inference_mode():
        for i in range(MOSAIC):
            for j in range(MOSAIC):
                inst, _ = detect_image(
                    model, image[i * cell : (i + 1) * cell, j * cell : (j + 1) * cell], predict
                )
                inst = nuclei(inst, rule)  # each image's own nuclei
                inst.offsets = inst.offsets + np.array([i * cell, j * cell])
                parts.append(inst)
    tiled = concat_instances(parts, TISSUE, TISSUE)
    with torch.inference_mode():
        one, _ = detect_image(model, image, predict)  # the mosaic as one image: same tiles, no blocks
    one = nuclei(one, rule)
    same = _match(whole, one)
    print(
        f"seams: slide (blocks) vs the mosaic as one image (detect_image): {same[0]} matched, {same[1]} only in "
        f"the slide, {same[2]} only in the one image (block seams: nothing lost or doubled when both are 0)"
    )
    matched, only_whole, only_tiled = _match(whole, tiled)
    k = max(SYNTH_CLASSES, len(_classes(checkpoint)))  # the synthetic truth's classes and the model's
    pq_whole = score_split(["m"], [truth], [whole], rule, k).metrics["pq"]
    pq_tiled = score_split(["m"], [truth], [tiled], rule, k).metrics["pq"]
    print(
        f"seams: {summary.blocks} blocks; slide {len(whole)} nuclei, image by image {len(tiled)}: {matched} "
        f"matched, {only_whole} only in the slide, {only_tiled} only image by image; truth {len(truth)}"
    )
    print(f"seams: PQ slide {pq_whole:.4f}, image by image {pq_tiled:.4f}")
    delta = abs(pq_whole - pq_tiled)
    print(f"seams: |PQ slide - PQ image by image| = {delta:.4f} (limit 0.005)")
    return delta


def bench_workers(checkpoint: Path, folder: Path) -> float:
    params, predict = _settings(checkpoint)
    path, _, _ = _mosaic(folder)
    settings = dataclasses.replace(params.slide, block_tiles=1)
    rates, results = [], []
    for workers in (1, 2):
        t0 = time.perf_counter()
        summary = _run(path, checkpoint, folder / f"workers{workers}", predict, settings, workers)
        seconds = time.perf_counter() - t0
        mpx = summary.tissue_mm2 * 1e6 / MPP**2 / 1e6
        rates.append(mpx / seconds)
        results.append(_slide_instances(summary, predict))
        print(
            f"workers: {workers}: {sum(summary.counts.values())} nuclei, {mpx:.2f} tissue Mpx in {seconds:.1f} s "
            f"(cluster start included) = {rates[-1]:.3f} Mpx/s"
        )
    from cellseg.nuclei import NucleusRule, label_map

    one, two = results
    matched, only_one, only_two = _match(one, two)
    a, b = label_map(one, NucleusRule()), label_map(two, NucleusRule())
    class_a = np.concatenate([[0], a.classes])[a.ids]
    class_b = np.concatenate([[0], b.classes])[b.ids]
    differ = int(
        ((a.ids > 0) != (b.ids > 0)).sum() + ((class_a != class_b) & (a.ids > 0) & (b.ids > 0)).sum()
    )
    print(
        f"workers: 1 vs 2 workers: {matched} nuclei matched one to one, {only_one} only with 1, {only_two} only "
        f"with 2; {differ} pixels differ in nucleus or class (of {a.ids.size}); scores "
        f"{'identical' if sorted(one.scores.tolist()) == sorted(two.scores.tolist()) else 'differ in float rounding'}"
    )
    if only_one or only_two:
        raise CellsegError("1 and 2 workers gave different nuclei")
    ratio = rates[1] / rates[0]
    print(f"workers: throughput 2 workers / 1 worker = {ratio:.3f}")
    return ratio


def bench_overhead(checkpoint: Path, folder: Path) -> float:
    import torch

    from cellseg.infer.detect import _image_tensor
    from cellseg.infer.tiling import tile_windows
    from cellseg.infer.tta import detect_with_flips
    from cellseg.slide.run import _model

    params, predict = _settings(checkpoint)
    path, image, _ = _mosaic(folder)
    settings = params.slide
    model = _model(str(checkpoint), "cpu")  # loaded once per worker: not a per-slide cost
    _run(path, checkpoint, folder / "warm", predict, settings)  # warm caches (first-call costs)
    t0 = time.perf_counter()
    summary = _run(path, checkpoint, folder / "overhead", predict, settings)
    slide_seconds = time.perf_counter() - t0
    tiles = []
    for block in summary.tissue_blocks:
        w = block.window
        windows = tile_windows(w.height, w.width, predict.tile_size, predict.tile_overlap)
        for t in [windows[i] for i in block.tiles]:  # the tissue tiles, as the slide run predicts them
            y0, x0 = w.y0 + t.y0, w.x0 + t.x0
            tiles.append(np.ascontiguousarray(image[y0 : y0 + t.height, x0 : x0 + t.width]))
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(tiles), predict.batch_size):
            chunk = tiles[start : start + predict.batch_size]
            sizes = {c.shape for c in chunk}
            groups = [[c for c in chunk if c.shape == s] for s in sizes]
            for group in groups:
                detect_with_flips(
                    model, [_image_tensor(c, torch.device("cpu")) for c in group], predict.tta_views
                )
    forward = time.perf_counter() - t0
    print(
        f"overhead: {len(tiles)} tiles; forward passes alone {forward:.2f} s, the slide end to end {slide_seconds:.2f} s"
    )
    ratio = slide_seconds / forward
    print(f"overhead: slide / forward passes = {ratio:.3f} (limit 1.25)")
    return ratio


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_memory-child":
        _memory_child(*argv[1:4])
        return
    parser = argparse.ArgumentParser(prog="cellseg bench slide", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("models/best.pt"))
    parser.add_argument("--only", nargs="+", default=["memory", "seams", "workers", "overhead"],
                        choices=["memory", "seams", "workers", "overhead"])  # fmt: skip
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    parser.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one)")
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        raise CellsegError(f"{args.checkpoint}: no trained model (run `make demo` first)")
    torch_threads = os.environ.get("OMP_NUM_THREADS")
    print(
        f"slide benchmarks on {os.cpu_count()} CPUs (OMP_NUM_THREADS={torch_threads}), model {args.checkpoint}"
    )
    with tempfile.TemporaryDirectory(dir=args.keep) as tmp:
        folder = Path(tmp)
        ratios = {}
        for name in args.only:
            fn = {"memory": lambda f: bench_memory(args.checkpoint, args.sizes, f),
                  "seams": lambda f: bench_seams(args.checkpoint, f),
                  "workers": lambda f: bench_workers(args.checkpoint, f),
                  "overhead": lambda f: bench_overhead(args.checkpoint, f)}[name]  # fmt: skip
            sub = folder / name
            sub.mkdir()
            ratios[name] = fn(sub)
        print("ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))


if __name__ == "__main__":
    from cellseg.entry import run

    run(main)
