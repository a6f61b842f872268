"""Prediction: detections refined by the map-guided post-processing, then selected by ``predict.*``.

:func:`predict_image` serves the ``evaluate`` and ``submit`` stages and ``cellseg predict``; without ``postproc``
params it is :func:`cellseg.infer.detect.detect_and_select`. Equal-sized images share a forward pass
(:func:`predict_images`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from cellseg.infer.detect import detect_batch, detect_image, is_tiled, postprocess
from cellseg.infer.postproc import refine
from cellseg.infer.prob_maps import ProbMaps
from cellseg.instances import Instances
from cellseg.model.maskrcnn import CellMaskRCNN
from cellseg.params import PostprocParams, PredictParams


def _finish(
    inst: Instances, maps: ProbMaps | None, params: PredictParams, postproc: PostprocParams | None
) -> Instances:
    """The map-guided steps (when asked for and the model has heads), then :func:`postprocess`."""
    if postproc is not None:
        inst = refine(inst, maps, postproc)
    return postprocess(inst, params)


def predict_image(
    model: CellMaskRCNN,
    image: np.ndarray,
    params: PredictParams,
    device: torch.device | str = "cpu",
    postproc: PostprocParams | None = None,
) -> Instances:
    """Instances of one ``uint8 H×W×3`` image at its own resolution; tiled when larger than the tile size."""
    return predict_image_maps(model, image, params, device, postproc)[0]


def predict_image_maps(
    model: CellMaskRCNN,
    image: np.ndarray,
    params: PredictParams,
    device: torch.device | str = "cpu",
    postproc: PostprocParams | None = None,
) -> tuple[Instances, ProbMaps | None]:
    """:func:`predict_image` and the heads' maps at the image's pixels (``None`` without heads)."""
    inst, maps = detect_image(model, image, params, device)
    return _finish(inst, maps, params, postproc), maps


def predict_images(
    model: CellMaskRCNN,
    images: Iterable[np.ndarray],
    params: PredictParams,
    device: torch.device | str = "cpu",
    postproc: PostprocParams | None = None,
) -> Iterator[Instances]:
    """:func:`predict_image` of each image, in order and lazily.

    Consecutive untiled images of the same size share a forward pass (``params.batch_size`` at most), so
    callers that order images by size get batching without padding, which would change the detections.
    """
    for inst, _ in predict_images_maps(model, images, params, device, postproc):
        yield inst


def predict_images_maps(
    model: CellMaskRCNN,
    images: Iterable[np.ndarray],
    params: PredictParams,
    device: torch.device | str = "cpu",
    postproc: PostprocParams | None = None,
) -> Iterator[tuple[Instances, ProbMaps | None]]:
    """:func:`predict_images` with each image's maps (``None`` without heads), as :func:`predict_image_maps`."""
    device = torch.device(device)
    model.eval()
    pending: list[np.ndarray] = []
    for image in images:
        tiled = is_tiled(image, params)
        if pending and (tiled or image.shape != pending[0].shape or len(pending) == params.batch_size):
            yield from _predict_untiled(model, pending, params, device, postproc)
            pending = []
        if tiled:
            yield predict_image_maps(model, image, params, device, postproc)
        else:
            pending.append(image)
    yield from _predict_untiled(model, pending, params, device, postproc)


def _predict_untiled(
    model: CellMaskRCNN,
    images: list[np.ndarray],
    params: PredictParams,
    device: torch.device,
    postproc: PostprocParams | None,
) -> list[tuple[Instances, ProbMaps | None]]:
    found = detect_batch(model, images, device, params)
    return [(_finish(inst, maps, params, postproc), maps) for inst, maps in found]
