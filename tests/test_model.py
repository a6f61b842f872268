"""The model: all archs with and without auxiliary heads, map alignment, empty images, weight loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cellseg.data.dataset import instance_targets
from cellseg.model.maskrcnn import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CellTransform,
    PretrainedWeightsError,
    batch_maps,
    build_model,
    count_parameters,
    downsample_boundary,
    restore_to_input,
)
from cellseg.params import ParamsError, load_params
from conftest import ROOT

SMALL = {  # keep the R50 archs cheap on CPU: few proposals and RoIs
    "model.rpn_pre_nms_top_n_train": 200,
    "model.rpn_post_nms_top_n_train": 100,
    "model.rpn_pre_nms_top_n_test": 200,
    "model.rpn_post_nms_top_n_test": 100,
    "model.box_batch_size_per_image": 32,
    "model.box_detections_per_img": 20,
}


def _params(**overrides):
    return load_params(ROOT / "params.yaml", overrides={**SMALL, **overrides})


def _target(labels: np.ndarray) -> dict[str, torch.Tensor]:
    target = instance_targets(labels)
    h, w = labels.shape[1:]
    target["center"] = torch.rand(h, w)
    target["boundary"] = (torch.rand(h, w) > 0.7).float()
    return target


def _two_images() -> tuple[list[torch.Tensor], list[dict]]:
    """A 64×80 image with two cells of different classes and an empty 50×40 image."""
    labels = np.zeros((4, 64, 80), np.int32)
    labels[0, 10:20, 10:25] = 1
    labels[1, 30:42, 30:45] = 2
    empty = np.zeros((4, 50, 40), np.int32)
    return [torch.rand(3, 64, 80), torch.rand(3, 50, 40)], [_target(labels), _target(empty)]


@pytest.mark.parametrize("aux", [True, False], ids=["aux", "plain"])
@pytest.mark.parametrize(
    "arch",
    [
        pytest.param("maskrcnn_resnet50_fpn", marks=pytest.mark.slow),
        pytest.param("maskrcnn_resnet50_fpn_v2", marks=pytest.mark.slow),
        "maskrcnn_resnet18_fpn_lite",
    ],
)
def test_forward_backward_and_detect(arch: str, aux: bool) -> None:
    torch.manual_seed(0)
    model = build_model(*_model_aux(_params(**{"model.arch": arch, "aux.enabled": aux})))
    model.train()
    images, targets = _two_images()
    losses = model(images, targets)
    expected = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
    assert set(losses) == expected | ({"loss_center", "loss_boundary"} if aux else set())
    total = model.total_loss(losses)
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if aux:
        assert model.center_head[0].weight.grad.abs().sum() > 0
    model.eval()
    (det,) = model([torch.rand(3, 70, 90)])
    n = len(det["boxes"])
    # an untrained box head scores every class near 1/5, above box_score_thresh: detections must come out
    assert 0 < n <= 20 and det["mask_probs"].shape == (n, 28, 28)
    assert (det["boxes"][:, 2] <= 90).all() and (det["boxes"][:, 3] <= 70).all()


def _model_aux(params):
    return params.model, params.aux, len(params.classes)


def test_total_loss_weights_the_aux_terms() -> None:
    model = build_model(*_model_aux(_params(**{"aux.w_center": 0.25, "aux.w_boundary": 2.0})))
    losses = {
        "loss_mask": torch.tensor(1.0),
        "loss_center": torch.tensor(4.0),
        "loss_boundary": torch.tensor(3.0),
    }
    assert model.total_loss(losses).item() == pytest.approx(1.0 + 0.25 * 4.0 + 2.0 * 3.0)


def test_without_aux_it_is_plain_mask_rcnn() -> None:
    params = _params()
    with_aux = build_model(params.model, params.aux, 4)
    plain = build_model(params.model, _params(**{"aux.enabled": False}).aux, 4)
    assert not hasattr(plain, "center_head") and not hasattr(plain, "boundary_head")
    c, h = with_aux.backbone.out_channels, params.aux.hidden_channels
    head = c * h * 9 + h + h * 1 + 1  # conv3x3 + bias, conv1x1 + bias
    assert count_parameters(with_aux) - count_parameters(plain) == 2 * head
    assert set(with_aux.state_dict()) - set(plain.state_dict()) == {
        f"{name}_head.{i}.{p}" for name in ("center", "boundary") for i in (0, 2) for p in ("weight", "bias")
    }


@pytest.mark.parametrize("resize", ["scale", "min_max"])
def test_maps_follow_the_images_resize_and_padding(resize: str) -> None:
    """Two images of different sizes: after the model's transform, each map sits exactly on its image.

    The centre map is made equal to the image's red channel and the boundary map to a threshold of it; both then
    go through the transform, so the resized, padded maps must equal the resized, padded, de-normalised channel.
    """
    params = _params(
        **{"model.resize": resize, "model.scale": 1.7, "model.min_size": 96, "model.max_size": 200}
    )
    transform = CellTransform(params.model)
    images, targets = [], []
    for h, w in [(45, 70), (66, 38)]:
        image = torch.rand(3, h, w)
        labels = np.zeros((4, h, w), np.int32)
        labels[0, 5:15, 5:15] = 1
        target = instance_targets(labels)
        target["center"] = image[0].clone()
        target["boundary"] = (image[0] > 0.5).float()
        images.append(image)
        targets.append(target)
    batch, out = transform(images, targets)
    maps = batch_maps(out, batch.tensors.shape[-2:])
    assert maps.shape == (2, 2, *batch.tensors.shape[-2:])
    for i, ((h, w), image) in enumerate(zip(batch.image_sizes, images, strict=True)):
        red = batch.tensors[i, 0, :h, :w] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
        torch.testing.assert_close(maps[i, 0, :h, :w], red, atol=1e-5, rtol=0)
        nearest = F.interpolate((image[0] > 0.5).float()[None, None], size=(h, w))[0, 0]
        torch.testing.assert_close(maps[i, 1, :h, :w], nearest)
        assert (
            maps[i, :, h:, :].abs().sum() == 0 and maps[i, :, :, w:].abs().sum() == 0
        )  # padding is background
        assert (h, w) != tuple(batch.tensors.shape[-2:])  # padding really happened


def test_an_image_without_instances_trains() -> None:
    torch.manual_seed(0)
    model = build_model(*_model_aux(_params()))
    model.train()
    empty = np.zeros((4, 48, 48), np.int32)
    losses = model(
        [torch.rand(3, 48, 48), torch.rand(3, 40, 56)], [_target(empty), _target(empty[:, :40, :56])]
    )
    total = model.total_loss(losses)
    assert torch.isfinite(total)
    total.backward()
    assert instance_targets(empty)["boxes"].shape == (0, 4)
    _assert_every_trainable_parameter_has_a_finite_gradient(model)


def _assert_every_trainable_parameter_has_a_finite_gradient(model: torch.nn.Module) -> None:
    """A parameter without gradient would also stop DistributedDataParallel (unused parameters)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) > 50 and any(n.startswith("center_head") for n, _ in trainable)
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, f"no gradient: {missing}"
    bad = [n for n, p in trainable if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradient: {bad}"


def test_mixed_precision_forward_and_backward_with_the_heads() -> None:
    """bfloat16 autocast on the CPU (what train.precision=bf16 does on a GPU), heads on: finite losses, every
    trainable parameter gets a finite gradient, and detection runs under autocast too."""
    torch.manual_seed(0)
    model = build_model(*_model_aux(_params()))
    model.train()
    images, targets = _two_images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, targets)
        total = model.total_loss(losses)
    assert {"loss_center", "loss_boundary", "loss_mask"} <= losses.keys()
    assert all(torch.isfinite(v) for v in losses.values()) and torch.isfinite(total)
    total.backward()
    _assert_every_trainable_parameter_has_a_finite_gradient(model)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        (detections,) = model.detect(images[:1])
    assert len(detections["boxes"]) > 0, "an untrained model still detects above box_score_thresh"
    assert detections["boxes"].shape[1:] == (4,) and detections["boxes"].dtype.is_floating_point


def test_local_weights_file_loads_matching_tensors(tmp_path: Path) -> None:
    params = _params()
    torch.manual_seed(1)
    source = build_model(params.model, params.aux, 4)
    torch.save({"model": source.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")  # a cellseg checkpoint
    loaded = build_model(_params(**{"model.pretrained": str(tmp_path / "ckpt.pt")}).model, params.aux, 4)
    own = loaded.state_dict()
    assert len(own) > 100 and not any(k.endswith("num_batches_tracked") for k in own)  # BN frozen, as below
    for key, value in own.items():
        torch.testing.assert_close(value, source.state_dict()[key])
    torch.save({"unrelated.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(PretrainedWeightsError, match="other.pt: no tensor fits"):
        build_model(_params(**{"model.pretrained": str(tmp_path / "other.pt")}).model, params.aux, 4)
    with pytest.raises(PretrainedWeightsError, match="missing.pt is not a file"):
        build_model(_params(**{"model.pretrained": str(tmp_path / "missing.pt")}).model, params.aux, 4)
    (tmp_path / "notes.pt").write_text("not a torch file")
    with pytest.raises(PretrainedWeightsError, match=r"notes\.pt: cannot read as a weights file"):
        build_model(_params(**{"model.pretrained": str(tmp_path / "notes.pt")}).model, params.aux, 4)
    torch.save([torch.zeros(3)], tmp_path / "list.pt")
    with pytest.raises(
        PretrainedWeightsError, match=r"list\.pt: expected a state dict of tensors, found list"
    ):
        build_model(_params(**{"model.pretrained": str(tmp_path / "list.pt")}).model, params.aux, 4)


def test_a_weights_file_trains_like_the_named_sources(tmp_path: Path, capsys) -> None:
    """Frozen backbone BatchNorm and ``trainable_layers``, as with imagenet/coco; skipped tensors reported."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    params = _params()
    state = build_model(params.model, params.aux, 4).state_dict()
    state["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(3, 3)  # another head's shape
    torch.save(state, tmp_path / "weights.pt")
    pretrained = _params(**{"model.pretrained": str(tmp_path / "weights.pt"), "model.trainable_layers": 3})
    model = build_model(pretrained.model, pretrained.aux, 4)
    body = model.backbone.body
    assert isinstance(body.bn1, FrozenBatchNorm2d) and isinstance(body.layer3[0].bn1, FrozenBatchNorm2d)
    assert not body.conv1.weight.requires_grad and not body.layer1[0].conv1.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad and body.layer4[0].conv1.weight.requires_grad
    out = capsys.readouterr().out
    assert (
        "1 skipped (name or shape not in maskrcnn_resnet18_fpn_lite): roi_heads.box_predictor.cls_score"
        in out
    )


def test_offline_download_fails_fast_with_a_clear_message(tmp_path: Path, monkeypatch) -> None:
    """Offline users get an error that says where to put the file, not a hang (the download is simulated)."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(url, dst, progress=True):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    params = _params(**{"model.pretrained": "imagenet"})
    with pytest.raises(PretrainedWeightsError, match=r"cannot download .*resnet18.*Offline\? .*checkpoints"):
        build_model(params.model, params.aux, 4)
    coco = _params(**{"model.pretrained": "coco"})
    with pytest.raises(PretrainedWeightsError, match="no COCO Mask R-CNN for ResNet-18"):
        build_model(coco.model, coco.aux, 4)


def test_cached_imagenet_weights_are_used_without_network(tmp_path: Path, monkeypatch) -> None:
    """A weights file already in torch's hub cache is loaded (here a stand-in ResNet-18 state dict)."""
    from torchvision.models import ResNet18_Weights, resnet18

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("must not download"))
    torch.manual_seed(2)
    stand_in = resnet18().state_dict()
    cached = tmp_path / "checkpoints" / Path(ResNet18_Weights.IMAGENET1K_V1.url).name
    cached.parent.mkdir(parents=True)
    torch.save(stand_in, cached)
    params = _params(**{"model.pretrained": "imagenet", "model.trainable_layers": 3})
    model = build_model(params.model, params.aux, 4)
    torch.testing.assert_close(model.backbone.body.conv1.weight, stand_in["conv1.weight"])
    assert not model.backbone.body.conv1.weight.requires_grad  # 3 trainable layers: layer2..4 only
    assert model.backbone.body.layer4[0].conv1.weight.requires_grad


def test_parameter_errors_name_the_key() -> None:
    with pytest.raises(ParamsError, match="model.arch must be one of"):
        _params(**{"model.arch": "resnet9000"})
    with pytest.raises(ParamsError, match="aux.w_boundary must be >= 0"):
        _params(**{"aux.w_boundary": -0.1})
    with pytest.raises(ParamsError, match="unknown key.*aux.w_boundry"):
        _params(**{"aux.w_boundry": 0.2})


def test_roi_poolers_know_the_fpn_strides_before_any_batch() -> None:
    """torchvision would guess them from the first batch (wrongly for a 43-px image) and keep the guess."""
    model = build_model(*_model_aux(_params()))
    for pool in (model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool):
        assert pool.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    model.train()
    labels = np.zeros((4, 43, 44), np.int32)
    labels[0, 5:20, 5:20] = 1
    model([torch.rand(3, 43, 44)], [_target(labels)])
    assert model.roi_heads.mask_roi_pool.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]


def test_mask_targets_equal_torchvision_s_from_the_matched_masks_only() -> None:
    from torchvision.models.detection import roi_heads

    from cellseg.model.mask_targets import _TORCHVISION, project_masks_on_boxes

    assert roi_heads.project_masks_on_boxes is project_masks_on_boxes  # installed for maskrcnn_loss
    gen = torch.Generator().manual_seed(0)
    masks = (torch.rand(40, 64, 80, generator=gen) > 0.5).to(torch.uint8)
    corner = torch.rand(12, 2, generator=gen) * torch.tensor([70.0, 54.0])
    boxes = torch.cat([corner, corner + 1 + torch.rand(12, 2, generator=gen) * 20], dim=1)
    for matched in (torch.randint(0, 40, (12,), generator=gen), torch.arange(40)[:12].flip(0)):
        ours = project_masks_on_boxes(masks, boxes, matched, 28)
        torch.testing.assert_close(ours, _TORCHVISION(masks, boxes, matched, 28), rtol=0, atol=0)
    few = masks[:5]  # fewer masks than RoIs: torchvision's way, unchanged
    matched = torch.randint(0, 5, (12,), generator=gen)
    torch.testing.assert_close(
        project_masks_on_boxes(few, boxes, matched, 28), _TORCHVISION(few, boxes, matched, 28)
    )


# ---------------------------------------------------------------------------------- maps at inference
def test_detect_returns_the_heads_maps_at_each_input_size() -> None:
    torch.manual_seed(0)
    model = build_model(*_model_aux(_params())).eval()
    sizes = [(70, 90), (45, 61)]
    dets = model([torch.rand(3, *size) for size in sizes])
    for det, size in zip(dets, sizes, strict=True):
        for key in ("center", "boundary"):
            assert det[key].shape == size
            assert 0.0 <= float(det[key].min()) and float(det[key].max()) <= 1.0
    plain = build_model(*_model_aux(_params(**{"aux.enabled": False}))).eval()
    (det,) = plain([torch.rand(3, 70, 90)])
    assert "center" not in det and "boundary" not in det


def _blob(height: int, width: int, cy: float, cx: float, sigma: float = 6.0) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))


@pytest.mark.parametrize(
    "model_changes",
    [
        {"model.scale": 1.0},
        {"model.scale": 1.7},
        {"model.scale": 0.6},
        {"model.resize": "min_max", "model.min_size": 96, "model.max_size": 200},
    ],
    ids=["scale1", "scale1.7", "scale0.6", "min_max"],
)
def test_restored_maps_sit_on_the_input_pixels(model_changes: dict) -> None:
    """A blob map goes through the model's resize and padding, is averaged over stride-4 blocks as the heads'
    feature is, and comes back by :func:`restore_to_input` to where it was."""
    transform = CellTransform(_params(**model_changes).model)
    sizes = [(45, 70), (66, 38)]
    maps = [_blob(45, 70, 20.0, 41.0), _blob(66, 38, 37.0, 17.0)]
    batch, _ = transform([m.expand(3, -1, -1).clone() for m in maps])
    resized = batch.tensors[:, :1] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    for i, (h, w) in enumerate(batch.image_sizes):
        resized[i, :, h:, :] = resized[i, :, :, w:] = 0.0  # the padding of a map is 0, not de-normalised 0
    feature = F.avg_pool2d(resized, 4)
    restored = restore_to_input(feature, batch.tensors.shape[-2:], batch.image_sizes, sizes)
    for back, original in zip(restored, maps, strict=True):
        assert back.shape == (1, *original.shape)
        # Pooling and upsampling blur the blob but keep its centre of mass: a map misplaced by one feature
        # cell moves it by 1.5-7 px here, a half-pixel slip by about 0.5 px.
        np.testing.assert_allclose(_centroid(back[0]), _centroid(original), atol=0.05)


def _centroid(values: torch.Tensor) -> np.ndarray:
    yy, xx = torch.meshgrid(torch.arange(values.shape[0]), torch.arange(values.shape[1]), indexing="ij")
    return np.array([float((values * yy).sum() / values.sum()), float((values * xx).sum() / values.sum())])


@pytest.mark.parametrize("start", [0, 1, 2, 3, 9])
def test_a_two_pixel_boundary_band_survives_max_pooling(start: int) -> None:
    boundary = torch.zeros(1, 1, 32, 32)
    boundary[..., start : start + 2] = 1.0  # a vertical band 2 px wide
    block = start // 4 if (start % 4) < 3 else None  # the 4-px block holding its first column
    pooled = downsample_boundary(boundary, (8, 8), "max")
    assert pooled[0, 0, :, start // 4].eq(1).all() and pooled.sum() == 8 * (1 + (start % 4 == 3))
    area = downsample_boundary(boundary, (8, 8), "area")
    assert float(area.sum()) == pytest.approx(float(boundary.sum()) / 16)
    nearest = downsample_boundary(boundary, (8, 8), "nearest")
    assert nearest.sum() == (8 if start % 4 in (0, 3) else 0)  # samples column 4k only: drops most bands
    assert block is None or area[0, 0, 0, block] > 0


def test_the_boundary_downsampling_changes_the_aux_loss() -> None:
    torch.manual_seed(0)
    feature = torch.randn(1, 64, 8, 8)
    maps = torch.zeros(1, 2, 32, 32)
    maps[:, 1, :, 9:11] = 1.0
    losses = {}
    for mode in ("nearest", "max", "area"):
        torch.manual_seed(1)
        model = build_model(*_model_aux(_params(**{"aux.boundary_downsample": mode})))
        with torch.no_grad():
            losses[mode] = float(model.aux_losses(feature, maps)["loss_boundary"])
    assert len(set(losses.values())) == 3
    with pytest.raises(ParamsError, match="aux.boundary_downsample must be one of"):
        _params(**{"aux.boundary_downsample": "bicubic"})


def test_map_losses_on_validation_images_change_nothing() -> None:
    torch.manual_seed(0)
    model = build_model(*_model_aux(_params(**{"model.scale": 1.5}))).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    image = torch.rand(3, 40, 56)
    maps = {"center": torch.rand(40, 56), "boundary": (torch.rand(40, 56) > 0.8).float()}
    losses = model.map_losses([image], [maps])
    assert set(losses) == {"loss_center", "loss_boundary"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # batch norm untouched
