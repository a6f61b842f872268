"""RoIAlign on the CPU as one weighted gather (``embedding_bag``) over channels-last features.

torchvision's CPU ``roi_align`` loops over RoIs, channels and samples on one thread, forward and backward; in
the CPU recipe's training step its backward alone was about a quarter of the time (profiled: 8 calls of
20 ms per step, box and mask poolers at 4 FPN levels). The same bilinear samples can be written as, for each
output bin, a bag of ``sampling_ratio² × 4`` feature rows (the 4 neighbours of each sample point) with their
bilinear weights: ``F.embedding_bag(mode="sum", per_sample_weights=…)`` over the features viewed as an
``(N·H·W) × C`` table. On channels-last features that view is free, and the gather and its backward
(a weighted scatter-add) run vectorised over channels. Same values as torchvision's kernel up to float
rounding (``tests/test_cpu_roi_align.py``); ``cellseg bench train`` measures the step.

Only what Mask R-CNN's poolers use is replaced: CPU tensors, ``aligned=False``, a positive ``sampling_ratio``
and channels-last features (on contiguous ones the table would be a copy each call). Anything else goes to
torchvision's kernel, so CUDA and the mask-target projection (1-channel contiguous masks) are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import poolers
from torchvision.ops import roi_align as torchvision_roi_align


def _axis(coords: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Neighbour indices, their bilinear weights and validity along one axis, as torchvision computes them.

    A sample beyond ``[-1, size]`` contributes nothing; otherwise it is clamped into the map (``<= 0`` → 0, and
    at or past the last pixel it takes that pixel whole).
    """
    valid = (coords >= -1.0) & (coords <= size)
    coords = coords.clamp(min=0.0)
    low = coords.floor().to(torch.int64).clamp(max=size - 1)
    high = (low + 1).clamp(max=size - 1)
    coords = torch.where(low >= size - 1, low.to(coords.dtype), coords)
    frac = coords - low
    return low, high, 1.0 - frac, frac, valid


def gather_roi_align(
    features: Tensor, rois: Tensor, output_size: tuple[int, int], spatial_scale: float, sampling_ratio: int
) -> Tensor:
    """``roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned=False)`` for
    ``rois`` of shape ``K × 5`` (image index, x1, y1, x2, y2), ``sampling_ratio > 0``."""
    ph, pw = output_size
    s = sampling_ratio
    n, c, h, w = features.shape
    k = rois.shape[0]
    r = rois.to(torch.float32)
    x1, y1 = r[:, 1] * spatial_scale, r[:, 2] * spatial_scale
    roi_w = torch.clamp(r[:, 3] * spatial_scale - x1, min=1.0)
    roi_h = torch.clamp(r[:, 4] * spatial_scale - y1, min=1.0)
    steps_x = (torch.arange(pw * s, dtype=torch.float32, device=r.device) + 0.5) / s  # in bins
    steps_y = (torch.arange(ph * s, dtype=torch.float32, device=r.device) + 0.5) / s
    xs = x1[:, None] + steps_x[None] * (roi_w / pw)[:, None]  # K × pw·s sample columns
    ys = y1[:, None] + steps_y[None] * (roi_h / ph)[:, None]  # K × ph·s sample rows
    x_lo, x_hi, wx_lo, wx_hi, x_ok = _axis(xs, w)
    y_lo, y_hi, wy_lo, wy_hi, y_ok = _axis(ys, h)
    base = (r[:, 0].to(torch.int64) * (h * w))[:, None, None]

    def rows(y: Tensor, x: Tensor) -> Tensor:
        return base + y[:, :, None] * w + x[:, None, :]

    def weight(a: Tensor, b: Tensor) -> Tensor:
        return a[:, :, None] * b[:, None, :]

    # mean over the s² samples of a bin; samples outside the map weigh 0
    keep = (y_ok[:, :, None] & x_ok[:, None, :]).to(torch.float32) / (s * s)
    index = torch.stack(
        [rows(y_lo, x_lo), rows(y_lo, x_hi), rows(y_hi, x_lo), rows(y_hi, x_hi)], dim=-1
    )  # K × ph·s × pw·s × 4
    weights = (
        torch.stack(
            [weight(wy_lo, wx_lo), weight(wy_lo, wx_hi), weight(wy_hi, wx_lo), weight(wy_hi, wx_hi)], dim=-1
        )
        * keep[..., None]
    )

    def bags(t: Tensor) -> Tensor:  # one bag per output bin: its s × s samples × 4 neighbours
        return t.reshape(k, ph, s, pw, s, 4).permute(0, 1, 3, 2, 4, 5).reshape(k * ph * pw, s * s * 4)

    table = features.float().permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view on channels-last fp32
    pooled = F.embedding_bag(bags(index), table, per_sample_weights=bags(weights), mode="sum")
    return pooled.reshape(k, ph, pw, c).permute(0, 3, 1, 2).to(features.dtype)


def _uses_gather(features: Tensor, rois: Tensor, sampling_ratio: int, aligned: bool) -> bool:
    return (
        features.device.type == "cpu"
        and isinstance(rois, Tensor)
        and not aligned
        and sampling_ratio > 0
        and features.dim() == 4
        and features.shape[2] > 0
        and features.shape[3] > 0
        and features.is_contiguous(memory_format=torch.channels_last)
        and not features.is_contiguous()  # a 1-channel or 1×1 map is both: nothing to gain there
    )


def roi_align(
    input: Tensor,  # noqa: A002 - torchvision's signature
    boxes,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """torchvision's ``roi_align`` signature; the gather on CPU channels-last features, torchvision's kernel
    otherwise."""
    if _uses_gather(input, boxes, sampling_ratio, aligned):
        size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        return gather_roi_align(input, boxes, size, spatial_scale, sampling_ratio)
    return torchvision_roi_align(input, boxes, output_size, spatial_scale, sampling_ratio, aligned)


def install() -> None:
    """Make torchvision's ``MultiScaleRoIAlign`` (which looks ``roi_align`` up in its module) use this one."""
    poolers.roi_align = roi_align
