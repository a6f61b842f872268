"""One slide through a trained model: tissue, blocks on Dask, per-block files (resume), seams, exports.

1. Open the slide, pick the level closest to the model's training resolution (``data.mpp`` saved in the
   checkpoint) and check that it reads.
2. Find the tissue on an overview; keep the blocks (:mod:`.blocks`) that hold some.
3. Predict each pending block as a Dask task (:func:`predict_block`: small arguments, the model loaded once per
   worker process). As each finishes, its result is written to ``DIR/.<stem>.partial/blocks/<row>_<col>.npz``
   (atomically), so an interrupted run resumes with the blocks still missing; a block whose worker died is
   retried by Dask (``slide.retries`` more times for an error).
4. Merge the blocks' seam detections (:func:`.blocks.resolve_seams`) and stream every nucleus into the exports
   (:mod:`.export`) of a temporary folder renamed to ``DIR/<stem>`` when complete.

Memory: one block's pixels and detections per worker; the client holds the overview, one block file at a time
and the seam detections (those within a tile overlap of a block border, a few percent of the nuclei).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cellseg import CLASS_NAMES
from cellseg.fsutil import atomic_dir, save_npz, write_json
from cellseg.instances import Instances
from cellseg.params import PredictParams, SlideParams
from cellseg.provenance import PROVENANCE_FILE
from cellseg.slide.blocks import Block, block_grid, resolve_seams, seam_detections
from cellseg.slide.export import Nucleus, Writers, draw_outline, to_level0, write_picture
from cellseg.slide.labels import LabelImage
from cellseg.slide.reader import (
    SlideError,
    choose_level,
    model_size,
    open_slide,
    open_slide_cached,
    read_window,
)
from cellseg.slide.tissue import detect_tissue

CONNECT_TIMEOUT = "10s"
"""How long to wait for a ``--scheduler`` before calling it unreachable."""


@dataclass(frozen=True)
class SlideJob:
    """What every block of one slide shares; small, so that it travels with each task."""

    slide: str
    mpp: float | None  # --mpp, or None for the metadata's
    level: int
    target_mpp: float
    height: int  # model pixels
    width: int
    checkpoint: str
    predict: PredictParams
    device: str
    threads: int


# ---------------------------------------------------------------- the worker side

_MODELS: dict[tuple[str, str], object] = {}


def _model(checkpoint: str, device: str):
    """The checkpoint's model, loaded once per worker process."""
    key = (checkpoint, device)
    if key not in _MODELS:
        import torch

        from cellseg.model.checkpoint import load_trained_model

        _MODELS.clear()
        model, _ = load_trained_model(checkpoint, torch.device(device))
        model.eval()
        _MODELS[key] = model
    return _MODELS[key]


def keep_threshold(params: PredictParams) -> float:
    """Detections scoring below this are not nuclei in any hard output (as in the label maps)."""
    return max(params.score_threshold, params.label_score_threshold)


def predict_block(job: SlideJob, block: Block) -> dict[str, np.ndarray]:
    """One block's detections: the interior ones above the score threshold, and every seam one (the seam rules
    need them all), as packed arrays (:func:`pack`) with window-local offsets.

    The block's tissue tiles (``block.tiles``) go through the model exactly as ``detect_image`` would send them
    (same tiles, same batches) and are merged by ``merge_tiles``; tiles without tissue are not predicted.
    """
    import torch

    from cellseg.infer.detect import detect_batch
    from cellseg.infer.tiling import merge_tiles

    if job.threads > 0 and torch.get_num_threads() != job.threads:
        torch.set_num_threads(job.threads)
    model = _model(job.checkpoint, job.device)
    slide = open_slide_cached(job.slide, job.mpp)
    w = block.window
    image = read_window(slide, job.level, job.target_mpp, w.y0, w.x0, w.height, w.width)
    windows = block.tile_windows(job.predict.tile_size, job.predict.tile_overlap)
    if block.tiles is not None:
        windows = [windows[i] for i in block.tiles]
    tiles = [image[t.y0 : t.y0 + t.height, t.x0 : t.x0 + t.width] for t in windows]
    with torch.inference_mode():
        found = detect_batch(model, tiles, torch.device(job.device), job.predict)
    inst = merge_tiles([f[0] for f in found], windows, w.height, w.width)
    seam = seam_detections(inst, block, job.height, job.width)
    interior = ~seam & (inst.scores >= keep_threshold(job.predict))
    return {**pack(inst.select(interior), "interior_"), **pack(inst.select(seam), "seam_")}


def pack(inst: Instances, prefix: str) -> dict[str, np.ndarray]:
    """Instances as a few flat arrays (crops as one bit string), for a small ``.npz``."""
    shapes = np.asarray([c.shape for c in inst.crops], np.int32).reshape(-1, 2)
    bits = (
        np.packbits(np.concatenate([c.ravel() for c in inst.crops])) if len(inst) else np.zeros(0, np.uint8)
    )
    return {
        f"{prefix}labels": inst.labels.astype(np.int8),
        f"{prefix}scores": inst.scores.astype(np.float32),
        f"{prefix}offsets": inst.offsets.astype(np.int32),
        f"{prefix}shapes": shapes,
        f"{prefix}bits": bits,
    }


def unpack(arrays, prefix: str, height: int, width: int) -> Instances:
    shapes = arrays[f"{prefix}shapes"]
    sizes = shapes[:, 0].astype(np.int64) * shapes[:, 1]
    flat = np.unpackbits(arrays[f"{prefix}bits"], count=int(sizes.sum())).astype(bool)
    ends = np.cumsum(sizes)
    crops = [flat[e - s : e].reshape(h, w) for e, s, (h, w) in zip(ends, sizes, shapes, strict=True)]
    return Instances(
        height,
        width,
        arrays[f"{prefix}labels"].astype(np.int64),
        arrays[f"{prefix}scores"].astype(np.float32),
        arrays[f"{prefix}offsets"].astype(np.int64).reshape(-1, 2),
        crops,
    )


# ---------------------------------------------------------------- the client side


def slide_stem(path: str | Path) -> str:
    """The name of a slide's output folder: its file name without the extension (and without ``.ome``)."""
    stem = Path(path).stem
    return stem[: -len(".ome")] if stem.lower().endswith(".ome") else stem


@dataclass
class SlideSummary:
    stem: str
    out: Path
    counts: dict[str, int]
    tissue_mm2: float
    blocks: int
    blocks_resumed: int
    seconds: float
    level: int
    level_mpp: float
    work: Path | None = None
    job: SlideJob | None = None
    blocks_done: list[Block] | None = None

    def line(self) -> str:
        total = sum(self.counts.values())
        per_class = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        return (
            f"{self.stem}: {total} nuclei ({per_class}); tissue {self.tissue_mm2:.3f} mm²; "
            f"{self.blocks} blocks ({self.blocks_resumed} resumed) from level {self.level} "
            f"({self.level_mpp:.4f} µm/px); {self.seconds:.1f} s -> {self.out}"
        )


def local_cluster(workers: int):
    """A ``LocalCluster`` of ``workers`` single-threaded processes, listening on loopback only (scheduler,
    workers and dashboard): tasks are pickles, so only this machine may talk to it."""
    from distributed import LocalCluster

    return LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        silence_logs=40,  # logging.ERROR
    )


@contextmanager
def dask_client(workers: int, scheduler: str | None) -> Iterator[object]:
    """A Dask client: on ``scheduler`` (an existing cluster) or on a fresh local cluster."""
    from distributed import Client

    if scheduler:
        try:
            client = Client(scheduler, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError, ValueError) as err:
            raise SlideError(
                f"Dask scheduler {scheduler}: unreachable ({type(err).__name__}: {err})"
            ) from None
        try:
            yield client
        finally:
            client.close()
        return
    cluster = local_cluster(workers)
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def _fingerprint(job: SlideJob, grid: dict) -> dict:
    stat = os.stat(job.slide)
    ck = os.stat(job.checkpoint)
    return {
        "slide": str(Path(job.slide).resolve()),
        "slide_size": stat.st_size,
        "slide_mtime_ns": stat.st_mtime_ns,
        "checkpoint": str(Path(job.checkpoint).resolve()),
        "checkpoint_size": ck.st_size,
        "checkpoint_mtime_ns": ck.st_mtime_ns,
        "level": job.level,
        "target_mpp": job.target_mpp,
        "mpp": job.mpp,
        "predict": asdict(job.predict),
        "grid": grid,
    }


def _work_dir(out_dir: Path, stem: str, fingerprint: dict) -> Path:
    """``DIR/.<stem>.partial``, holding the finished blocks of an earlier run of the same job (else empty)."""
    work = out_dir / f".{stem}.partial"
    manifest = work / "job.json"
    same = False
    if manifest.is_file():
        try:
            same = json.loads(manifest.read_text()) == json.loads(json.dumps(fingerprint))
        except json.JSONDecodeError:
            same = False
    if not same and work.exists():
        shutil.rmtree(work)
    (work / "blocks").mkdir(parents=True, exist_ok=True)
    if not same:
        manifest.write_text(json.dumps(fingerprint, indent=2) + "\n")
    return work


def run_slide(
    slide_path: str | Path,
    checkpoint: str | Path,
    out_dir: str | Path,
    target_mpp: float,
    predict: PredictParams,
    settings: SlideParams,
    *,
    mpp: float | None = None,
    workers: int = 1,
    scheduler: str | None = None,
    device: str = "cpu",
    client=None,
    progress: bool = True,
    stop_after: int | None = None,
    keep_work: bool = False,
    task=None,
    record: dict | None = None,
) -> SlideSummary:
    """Predict one slide into ``out_dir/<stem>/``. ``client``: an open Dask client to reuse (several slides);
    ``stop_after``: stop (raise KeyboardInterrupt) after that many new blocks, as an interrupt would (tests);
    ``keep_work``: keep the block files (``summary.work``, for :func:`slide_instances`: benchmarks);
    ``task``: the block function sent to Dask workers instead of :func:`predict_block` (tests); ``record``: the
    provenance written beside the results as ``provenance.json`` (the model, the settings, the slide)."""
    from tqdm import tqdm

    start = time.perf_counter()
    slide_path, out_dir = Path(slide_path), Path(out_dir)
    stem = slide_stem(slide_path)
    slide = open_slide(slide_path, mpp)
    try:
        level = choose_level(slide, target_mpp)
        height, width = model_size(slide, target_mpp)
        read_window(slide, level, target_mpp, 0, 0, min(8, height), min(8, width))  # the level reads at all
        overview = detect_tissue(
            slide, settings.tissue_max_side, settings.tissue_min_saturation, settings.tissue_max_saturation
        )
        level_mpp, slide_mpp = slide.level_mpp(level), slide.mpp
        size0 = (slide.height, slide.width)
    finally:
        slide.close()
    scale = target_mpp / slide_mpp  # level-0 px per model px
    blocks = block_grid(height, width, predict.tile_size, predict.tile_overlap, settings.block_tiles)

    def with_tissue_tiles(b: Block) -> Block:
        """``b`` with the indices of its tiles that hold tissue."""
        tiles = []
        for i, t in enumerate(b.tile_windows(predict.tile_size, predict.tile_overlap)):
            y0, x0 = (b.window.y0 + t.y0) * scale, (b.window.x0 + t.x0) * scale
            fraction = overview.tissue_fraction(y0, x0, y0 + t.height * scale, x0 + t.width * scale)
            if fraction > settings.min_tissue_fraction:
                tiles.append(i)
        return dataclasses.replace(b, tiles=tuple(tiles))

    tissue_blocks = [b for b in map(with_tissue_tiles, blocks) if b.tiles]
    tissue_mm2 = overview.tissue_area_um2(slide_mpp) / 1e6
    # local workers share this machine's cores; a remote cluster's workers keep their own setting (0)
    threads = max(1, (os.cpu_count() or 1) // workers) if (workers > 1 and not scheduler) else 0
    job = SlideJob(
        str(slide_path.resolve()), mpp, level, target_mpp, height, width, str(Path(checkpoint).resolve()),
        predict, device, threads,
    )  # fmt: skip
    grid = {  # what decides the blocks and their tiles: a change starts the slide over
        "tile": predict.tile_size,
        "overlap": predict.tile_overlap,
        **{k: getattr(settings, k) for k in ("block_tiles", "tissue_max_side", "tissue_min_saturation",
                                             "tissue_max_saturation", "min_tissue_fraction")},
    }  # fmt: skip
    work = _work_dir(out_dir, stem, _fingerprint(job, grid))
    done = {p.stem for p in (work / "blocks").glob("*.npz")}
    pending = [b for b in tissue_blocks if b.name not in done]
    resumed = len(tissue_blocks) - len(pending)
    if not tissue_blocks:
        print(f"warning: {slide_path}: no tissue found; writing an empty result", file=sys.stderr)

    bar = tqdm(
        total=len(tissue_blocks),
        initial=resumed,
        desc=stem,
        unit="block",
        disable=not progress,
        file=sys.stderr,
    )
    new = 0

    def finished(block: Block, result: dict) -> None:
        nonlocal new
        save_npz(work / "blocks" / f"{block.name}.npz", **result)
        bar.update(1)
        new += 1
        if stop_after is not None and new >= stop_after:
            raise KeyboardInterrupt(f"stopped after {new} blocks")

    try:
        if pending and (scheduler or workers > 1 or client is not None):
            with _client(client, workers, scheduler) as dask:
                _run_on_dask(dask, job, pending, finished, settings.retries, task)
        else:
            for block in pending:
                finished(block, predict_block(job, block))
    finally:
        bar.close()

    with atomic_dir(out_dir / stem) as tmp:
        counts = _assemble(tmp, stem, work, tissue_blocks, job, scale, slide_mpp, overview, settings, size0)
        if record is not None:
            write_json(tmp / PROVENANCE_FILE, {**record, "slide_file": str(slide_path), "level": level})
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return SlideSummary(
        stem,
        out_dir / stem,
        counts,
        tissue_mm2,
        len(tissue_blocks),
        resumed,
        time.perf_counter() - start,
        level,
        level_mpp,
        work if keep_work else None,
        job,
        tissue_blocks,
    )


@contextmanager
def _client(client, workers: int, scheduler: str | None):
    if client is not None:
        yield client
    else:
        with dask_client(workers, scheduler) as made:
            yield made


def _run_on_dask(client, job: SlideJob, pending: list[Block], finished, retries: int, task=None) -> None:
    from distributed import as_completed

    futures = {
        client.submit(
            task or predict_block,
            job,
            block,
            key=f"block-{Path(job.slide).stem}-{block.name}-{id(job)}",
            retries=retries,
            pure=False,
        ): block
        for block in pending
    }
    try:
        for future in as_completed(futures):
            try:
                result = future.result()
            except SlideError:
                raise
            except Exception as err:
                raise SlideError(
                    f"{job.slide}: block {futures[future].name} failed ({type(err).__name__}: {err})"
                ) from None
            finished(futures[future], result)
            future.release()
    finally:
        for future in futures:
            future.cancel()


def slide_instances(work: Path, blocks: list[Block], job: SlideJob) -> Iterator[Instances]:
    """The slide's nuclei in model pixels, chunk by chunk: each block's interior nuclei, then the merged seam
    nuclei (every chunk's offsets are slide coordinates)."""
    threshold = keep_threshold(job.predict)
    seam_parts = []
    for block in blocks:
        with np.load(work / "blocks" / f"{block.name}.npz") as arrays:
            w = block.window
            interior = unpack(arrays, "interior_", w.height, w.width)
            seam_parts.append(unpack(arrays, "seam_", w.height, w.width))
        interior.offsets = interior.offsets + np.array([w.y0, w.x0])
        interior.height, interior.width = job.height, job.width
        yield interior
    if blocks:
        merged = resolve_seams(seam_parts, blocks, job.height, job.width)
        yield merged.select(merged.scores >= threshold)


def _assemble(
    folder: Path,
    stem: str,
    work: Path,
    blocks: list[Block],
    job: SlideJob,
    scale: float,
    mpp: float,
    overview,
    settings: SlideParams,
    size0: tuple[int, int],
) -> dict[str, int]:
    """Stream every nucleus into the exports: interior nuclei block by block, then the merged seam nuclei."""
    writers = Writers(folder, stem, mpp, settings.gzip_geojson, settings.table_format)
    labels = LabelImage(folder / "labels.zarr", *size0, mpp) if settings.label_image else None
    picture = overview.image.copy()
    next_id = 1
    try:
        for inst in slide_instances(work, blocks, job):
            for k in range(len(inst)):
                crop = inst.crops[k]
                pixels = int(crop.sum())
                if not pixels:
                    continue
                offset = (int(inst.offsets[k][0]), int(inst.offsets[k][1]))
                polygon = to_level0(crop, offset, scale)
                label = int(inst.labels[k])
                writers.add(
                    Nucleus(next_id, label, float(inst.scores[k]), polygon, pixels * scale * scale, pixels)
                )
                draw_outline(picture, polygon, label, overview.scale_y, overview.scale_x)
                if labels is not None:
                    labels.paint(polygon, next_id)
                next_id += 1
    finally:
        writers.close()
        if labels is not None:
            labels.close()
    write_picture(folder / "thumbnail.png", picture)
    write_picture(folder / "tissue.png", (overview.mask * 255).astype(np.uint8))
    return {name: writers.counts[name] for name in CLASS_NAMES}
