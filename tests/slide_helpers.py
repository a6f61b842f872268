"""Helpers of the slide tests: painted slides whose nuclei a fake detector finds exactly, in any window."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from scipy import ndimage

from cellseg.instances import Instances
from cellseg.params import load_params

ROOT = Path(__file__).resolve().parents[1]
SVS = ROOT.parent / "shared" / "fixtures" / "slides" / "A9K0_2.svs"
TISSUE = (225, 150, 200)  # pink stroma: saturated, so it is tissue


def painted_tissue(height: int, width: int, seed: int = 0, radius: int = 7) -> tuple[np.ndarray, int]:
    """Pink tissue with dark nuclei (discs; class k has red = 40·k), none touching: ``(image, n_nuclei)``."""
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), np.uint8)
    image[:] = TISSUE
    taken = np.zeros((height, width), bool)
    yy, xx = np.mgrid[-radius - 2 : radius + 3, -radius - 2 : radius + 3]
    disc = yy**2 + xx**2 <= radius**2
    halo = yy**2 + xx**2 <= (radius + 2) ** 2
    n = 0
    for _ in range(height * width // 150):
        cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
        y0, x0 = cy - radius - 2, cx - radius - 2
        if y0 < 0 or x0 < 0 or y0 + halo.shape[0] > height or x0 + halo.shape[1] > width:
            continue
        region = taken[y0 : y0 + halo.shape[0], x0 : x0 + halo.shape[1]]
        if (region & halo).any():
            continue
        region |= halo
        k = int(rng.integers(1, 5))
        image[y0 : y0 + disc.shape[0], x0 : x0 + disc.shape[1]][disc] = (40 * k, 20, 120)
        n += 1
    return image, n


def fake_detect(model, image, params, device="cpu"):
    """Each dark blob of the window is one detection (class from its red level), as a model would see it."""
    dark = image[..., 1] < 60
    labels, n = ndimage.label(dark)
    offsets, crops, classes = [], [], []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        crops.append(labels[sl] == i)
        offsets.append((sl[0].start, sl[1].start))
        red = image[sl][..., 0][crops[-1]].mean()
        classes.append(int(np.clip(round(red / 40), 1, 4)))
    return (
        Instances(
            image.shape[0],
            image.shape[1],
            np.asarray(classes, np.int64),
            np.full(n, 0.9, np.float32),
            np.asarray(offsets, np.int64).reshape(-1, 2),
            crops,
        ),
        None,
    )


def fake_detect_batch(model, images, device, params):
    return [fake_detect(model, image, params) for image in images]


def use_fake_detector(monkeypatch) -> None:
    import cellseg.infer.detect
    import cellseg.slide.run

    monkeypatch.setattr(cellseg.infer.detect, "detect_batch", fake_detect_batch)
    monkeypatch.setattr(cellseg.slide.run, "_model", lambda checkpoint, device: None)


def slide_settings(**changes):
    """params.yaml's predict and slide sections with small tiles (blocks of 2×2 tiles of 128 px)."""
    params = load_params(ROOT / "params.yaml")
    predict = dataclasses.replace(
        params.predict, tile_size=128, tile_overlap=32, **changes.pop("predict", {})
    )
    slide = dataclasses.replace(params.slide, block_tiles=2, tissue_max_side=256, **changes)
    return predict, slide


def die_once_then_fake_predict(job, block):
    """A Dask task whose first attempt on block 0_0 kills its worker process (as an OOM kill would); every
    attempt after that predicts with :func:`fake_detect`. Runs in the worker, so it patches there."""
    import os

    import cellseg.infer.detect
    import cellseg.slide.run

    marker = Path(job.slide).parent / f"died-{block.name}"
    if block.name == "0_0" and not marker.exists():
        marker.write_text("killed\n")
        os._exit(1)
    cellseg.infer.detect.detect_batch = fake_detect_batch
    cellseg.slide.run._model = lambda checkpoint, device: None
    return cellseg.slide.run.predict_block(job, block)


def run_slide(slide, checkpoint, out_dir, target_mpp, predict, settings, *, stop_after=None, task=None,
              keep_work=False, client=None, **request):  # fmt: skip
    """:func:`cellseg.slide.run.run_slide` of a :class:`SlideRequest` built from the arguments, without a
    progress bar; ``stop_after`` (interrupt after that many new blocks, as Ctrl-C would), ``task`` (the block
    function Dask runs) and ``keep_work`` go through a :class:`SlideRunner` subclass, as the tests' hooks."""
    from cellseg.slide.run import SlideRequest, SlideRunner

    class Runner(SlideRunner):
        def block_saved(self, new_blocks: int) -> None:
            if stop_after is not None and new_blocks >= stop_after:
                raise KeyboardInterrupt(f"stopped after {new_blocks} blocks")

    Runner.keep_work = keep_work
    if task is not None:
        Runner.task = staticmethod(task)
    req = SlideRequest(Path(slide), Path(checkpoint), Path(out_dir), target_mpp, predict, settings, **request)
    return Runner(req, client, progress=False).run()
