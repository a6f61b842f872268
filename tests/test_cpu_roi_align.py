"""The gather RoIAlign gives torchvision's values and gradients, and the poolers use it only where it applies."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import roi_align as torchvision_roi_align

from cellseg.model import cpu_roi_align
from cellseg.model.cpu_roi_align import gather_roi_align, roi_align


def _case(seed: int, n: int = 3, c: int = 8, h: int = 24, w: int = 20, k: int = 60):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, c, h, w, generator=g)
    image = torch.randint(0, n, (k,), generator=g).float()
    # corners from well outside the map to past its far side, sizes from sub-pixel to the whole map
    xy = torch.rand(k, 2, generator=g) * torch.tensor([w * 4 + 40.0, h * 4 + 40.0]) - 20
    wh = torch.rand(k, 2, generator=g) * 60 + 0.2
    return features, torch.cat([image[:, None], xy, xy + wh], dim=1)


@pytest.mark.parametrize(
    ("size", "scale", "ratio"), [((7, 7), 0.25, 2), ((14, 14), 0.125, 2), ((5, 3), 0.5, 3)]
)
def test_values_and_gradients_match_torchvision(size, scale, ratio) -> None:
    features, rois = _case(seed=sum(size))
    ours_in = features.clone().requires_grad_()
    theirs_in = features.clone().requires_grad_()
    ours = gather_roi_align(ours_in, rois, size, scale, ratio)
    theirs = torchvision_roi_align(theirs_in, rois, size, scale, ratio, aligned=False)
    assert ours.shape == theirs.shape == (len(rois), features.shape[1], *size)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)
    assert (theirs == 0).any()  # the case has RoIs whose samples fall outside the map
    weights = torch.randn(theirs.shape, generator=torch.Generator().manual_seed(1))
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    assert torch.allclose(ours_in.grad, theirs_in.grad, atol=1e-4, rtol=1e-5)


def test_a_hand_built_roi_averages_its_bilinear_samples() -> None:
    features = torch.arange(16.0).reshape(1, 1, 4, 4)  # value = 4·y + x, linear: bilinear samples are exact
    rois = torch.tensor([[0.0, 0.0, 0.0, 2.0, 2.0]])
    # 1×1 output, 2×2 samples at x, y in {0.5, 1.5}: the mean is the value at (1, 1) = 5
    assert gather_roi_align(features, rois, (1, 1), 1.0, 2).item() == pytest.approx(5.0)
    beyond = torch.tensor([[0.0, 10.0, 10.0, 12.0, 12.0]])  # every sample past the map's edge + 1: zero
    assert gather_roi_align(features, beyond, (1, 1), 1.0, 2).item() == 0.0


def test_no_rois_gives_an_empty_result() -> None:
    features = torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    assert roi_align(features, torch.zeros(0, 5), (7, 7), 0.25, 2).shape == (0, 4, 7, 7)


def test_only_cpu_channels_last_aligned_false_uses_the_gather(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(cpu_roi_align, "gather_roi_align", lambda *a: calls.append(a) or torch.zeros(0))
    features, rois = _case(seed=3)
    last = features.contiguous(memory_format=torch.channels_last)
    roi_align(features, rois, (7, 7), 0.25, 2)  # contiguous: torchvision's kernel
    roi_align(last, rois, (7, 7), 0.25, 2, aligned=True)
    roi_align(last, rois, (7, 7), 0.25, -1)  # adaptive sampling
    assert not calls
    roi_align(last, rois, 7, 0.25, 2)
    assert len(calls) == 1 and calls[0][2] == (7, 7)


def test_mask_rcnn_poolers_give_the_same_result_through_the_gather_under_bf16_autocast() -> None:
    import cellseg.model.maskrcnn  # noqa: F401 - installs the gather into torchvision's poolers

    g = torch.Generator().manual_seed(0)
    levels = OrderedDict((str(i), torch.randn(2, 8, 64 >> i, 64 >> i, generator=g)) for i in range(4))
    boxes = [
        torch.tensor([[10.0, 12.0, 40.0, 30.0], [100.0, 90.0, 180.0, 200.0]]),
        torch.tensor([[0.0, 0.0, 255.0, 255.0]]),
    ]
    pool = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    sizes = [(256, 256), (256, 256)]
    plain = pool(levels, boxes, sizes)  # contiguous features: torchvision's kernel
    last = OrderedDict((k, v.contiguous(memory_format=torch.channels_last)) for k, v in levels.items())
    assert torch.allclose(pool(last, boxes, sizes), plain, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = OrderedDict((k, v.to(torch.bfloat16)) for k, v in last.items())
        pooled = pool(low, boxes, sizes)
    assert pooled.dtype == torch.bfloat16
    assert torch.allclose(pooled.float(), plain, atol=0.05)
