"""One slide through a trained model: a job description (:class:`SlideRequest`) and its driver (:class:`SlideRunner`).

1. Open the slide, pick the level closest to the model's training resolution (``data.mpp`` saved in the
   checkpoint) and check that it reads.
2. Find the tissue on an overview; keep the blocks (:mod:`.blocks`) that hold some.
3. Predict each pending block as a Dask task (:func:`predict_block`: small arguments, the model loaded once per
   worker process). As each finishes, its result is written to ``DIR/.<stem>.partial/blocks/<row>_<col>.npz``
   (atomically), so an interrupted run resumes with the blocks still missing; a block whose worker died is
   retried by Dask (``slide.retries`` more times for an error).
4. Turn the blocks' detections into the slide's nuclei (:mod:`.assemble`: seams merged, then the model's rule
   from detections to nuclei, :mod:`cellseg.nuclei`, window by window) and stream them into the output formats
   (``slide.outputs``, :mod:`cellseg.outputs`) and the pictures of a temporary folder renamed to
   ``DIR/<stem>`` when complete.

Memory: one block's pixels and detections per worker; the client holds the overview, a few rows of blocks'
nuclei and the seam detections (those within a tile overlap of a block border).
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cellseg import DEFAULT_CLASSES
from cellseg.fsutil import atomic_dir, save_npz, write_json
from cellseg.nuclei import NucleusRule
from cellseg.outputs import Nuclei, SinkContext, open_sinks
from cellseg.params import PredictParams, SlideParams
from cellseg.provenance import PROVENANCE_FILE
from cellseg.slide.assemble import pack, slide_nuclei
from cellseg.slide.blocks import Block, block_grid, seam_detections
from cellseg.slide.pictures import draw_outline, write_picture
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
class SlideRequest:
    """What to do with one slide: everything the driver needs, and nothing about how it runs in tests.

    ``predict`` carries the model's tuned thresholds (:class:`cellseg.model.bundle.ModelBundle`);
    ``target_mpp`` is the model's training resolution; ``mpp`` overrides the slide's own (``--mpp``);
    ``record`` is the provenance written beside the results; ``workers``/``scheduler`` choose where blocks run.
    """

    slide: Path
    checkpoint: Path
    out_dir: Path
    target_mpp: float
    predict: PredictParams
    settings: SlideParams
    mpp: float | None = None
    workers: int = 1
    scheduler: str | None = None
    device: str = "cpu"
    record: dict | None = None
    class_names: tuple[str, ...] = (
        DEFAULT_CLASSES  # the model's classes: `cellseg slide` passes ModelBundle's
    )

    @property
    def stem(self) -> str:
        return slide_stem(self.slide)

    @property
    def rule(self) -> NucleusRule:
        return NucleusRule.of(self.predict)


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
    """The checkpoint's network, loaded once per worker process."""
    key = (checkpoint, device)
    if key not in _MODELS:
        import torch

        from cellseg.model.checkpoint import load_trained_model

        _MODELS.clear()
        model, _ = load_trained_model(checkpoint, torch.device(device))
        model.eval()
        _MODELS[key] = model
    return _MODELS[key]


def predict_block(job: SlideJob, block: Block) -> dict[str, np.ndarray]:
    """One block's detections: the interior ones that can become nuclei (the rule's score thresholds), and every
    seam one (the seam rules need them all), as packed arrays (:func:`.assemble.pack`) with window-local offsets.

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
    interior = ~seam & NucleusRule.of(job.predict).candidates(inst)
    return {**pack(inst.select(interior), "interior_"), **pack(inst.select(seam), "seam_")}


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
    job: SlideJob | None = None
    grid: list[Block] = field(default_factory=list)  # every block of the slide
    tissue_blocks: list[Block] = field(default_factory=list)  # those predicted (they hold tissue)
    work: Path | None = None  # the block files, when the runner keeps them

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


def run_slide(request: SlideRequest, client=None, progress: bool = True) -> SlideSummary:
    """Predict one slide into ``request.out_dir/<stem>/``. ``client``: an open Dask client to reuse (several
    slides); otherwise one is started when ``request.workers > 1`` or a scheduler is named."""
    return SlideRunner(request, client, progress).run()


class SlideRunner:
    """The driver of one :class:`SlideRequest`. Subclasses change how blocks run, not what a slide gives:
    :attr:`task` (the function a worker runs per block), :attr:`keep_work` (keep the block files, for
    benchmarks that compare them) and :meth:`block_saved` (called after each new block file)."""

    task = staticmethod(predict_block)
    keep_work = False

    def __init__(self, request: SlideRequest, client=None, progress: bool = True) -> None:
        self.request, self.client, self.progress = request, client, progress

    def block_saved(self, new_blocks: int) -> None:
        """Called after each newly predicted block is on disk (``new_blocks`` so far in this run)."""

    def run(self) -> SlideSummary:
        from tqdm import tqdm

        req = self.request
        start = time.perf_counter()
        slide_path, out_dir = Path(req.slide), Path(req.out_dir)
        stem, predict, settings = req.stem, req.predict, req.settings
        slide = open_slide(slide_path, req.mpp)
        try:
            level = choose_level(slide, req.target_mpp)
            height, width = model_size(slide, req.target_mpp)
            read_window(slide, level, req.target_mpp, 0, 0, min(8, height), min(8, width))  # the level reads
            overview = detect_tissue(
                slide,
                settings.tissue_max_side,
                settings.tissue_min_saturation,
                settings.tissue_max_saturation,
            )
            level_mpp, slide_mpp = slide.level_mpp(level), slide.mpp
            size0 = (slide.height, slide.width)
        finally:
            slide.close()
        scale = req.target_mpp / slide_mpp  # level-0 px per model px
        grid = block_grid(height, width, predict.tile_size, predict.tile_overlap, settings.block_tiles)

        def with_tissue_tiles(b: Block) -> Block:
            """``b`` with the indices of its tiles that hold tissue."""
            tiles = []
            for i, t in enumerate(b.tile_windows(predict.tile_size, predict.tile_overlap)):
                y0, x0 = (b.window.y0 + t.y0) * scale, (b.window.x0 + t.x0) * scale
                fraction = overview.tissue_fraction(y0, x0, y0 + t.height * scale, x0 + t.width * scale)
                if fraction > settings.min_tissue_fraction:
                    tiles.append(i)
            return dataclasses.replace(b, tiles=tuple(tiles))

        tissue_blocks = [b for b in map(with_tissue_tiles, grid) if b.tiles]
        tissue_mm2 = overview.tissue_area_um2(slide_mpp) / 1e6
        # local workers share this machine's cores; a remote cluster's workers keep their own setting (0)
        threads = (
            max(1, (os.cpu_count() or 1) // req.workers) if (req.workers > 1 and not req.scheduler) else 0
        )
        job = SlideJob(
            str(slide_path.resolve()), req.mpp, level, req.target_mpp, height, width,
            str(Path(req.checkpoint).resolve()), predict, req.device, threads,
        )  # fmt: skip
        grid_key = {  # what decides the blocks and their tiles: a change starts the slide over
            "tile": predict.tile_size,
            "overlap": predict.tile_overlap,
            **{k: getattr(settings, k) for k in ("block_tiles", "tissue_max_side", "tissue_min_saturation",
                                                 "tissue_max_saturation", "min_tissue_fraction")},
        }  # fmt: skip
        work = _work_dir(out_dir, stem, _fingerprint(job, grid_key))
        done = {p.stem for p in (work / "blocks").glob("*.npz")}
        pending = [b for b in tissue_blocks if b.name not in done]
        resumed = len(tissue_blocks) - len(pending)
        if not tissue_blocks:
            print(f"warning: {slide_path}: no tissue found; writing an empty result", file=sys.stderr)
        bar = tqdm(
            total=len(tissue_blocks), initial=resumed, desc=stem, unit="block", disable=not self.progress,
            file=sys.stderr,
        )  # fmt: skip
        new = 0

        def finished(block: Block, result: dict) -> None:
            nonlocal new
            save_npz(work / "blocks" / f"{block.name}.npz", **result)
            bar.update(1)
            new += 1
            self.block_saved(new)

        try:
            if pending and (req.scheduler or req.workers > 1 or self.client is not None):
                with _client(self.client, req.workers, req.scheduler) as dask:
                    _run_on_dask(dask, job, pending, finished, settings.retries, self.task)
            else:
                for block in pending:
                    finished(block, self.task(job, block))
        finally:
            bar.close()

        context = SinkContext(
            Path(), stem, slide_mpp, size0[0], size0[1], req.class_names
        )  # the folder is set below, inside the temporary result folder
        with atomic_dir(out_dir / stem) as tmp:
            counts = self._write(
                dataclasses.replace(context, folder=tmp), work, grid, tissue_blocks, job, scale, overview
            )
            if req.record is not None:
                write_json(
                    tmp / PROVENANCE_FILE, {**req.record, "slide_file": str(slide_path), "level": level}
                )
        if not self.keep_work:
            shutil.rmtree(work, ignore_errors=True)
        return SlideSummary(
            stem, out_dir / stem, counts, tissue_mm2, len(tissue_blocks), resumed, time.perf_counter() - start,
            level, level_mpp, job, grid, tissue_blocks, work if self.keep_work else None,
        )  # fmt: skip

    def _write(self, context: SinkContext, work, grid, tissue_blocks, job, scale, overview) -> dict[str, int]:
        """Stream the slide's nuclei into every output format and the thumbnail; the count per class."""
        picture = overview.image.copy()
        counts = dict.fromkeys(self.request.class_names, 0)
        next_id = 1
        with open_sinks(self.request.settings.outputs, context) as sinks:
            for found in slide_nuclei(work, grid, tissue_blocks, job, self.request.rule):
                batch = Nuclei(found, np.arange(next_id, next_id + len(found)), scale=scale)
                next_id += len(found)
                for sink in sinks:
                    sink.add(batch)
                for label, polygon in zip(found.labels, batch.polygons, strict=True):
                    counts[self.request.class_names[int(label) - 1]] += 1
                    draw_outline(picture, polygon, int(label), overview.scale_y, overview.scale_x)
        write_picture(context.folder / "thumbnail.png", picture)
        write_picture(context.folder / "tissue.png", (overview.mask * 255).astype(np.uint8))
        return counts


@contextmanager
def _client(client, workers: int, scheduler: str | None):
    if client is not None:
        yield client
    else:
        with dask_client(workers, scheduler) as made:
            yield made


def _run_on_dask(client, job: SlideJob, pending: list[Block], finished, retries: int, task) -> None:
    from distributed import as_completed

    futures = {
        client.submit(
            task,
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
