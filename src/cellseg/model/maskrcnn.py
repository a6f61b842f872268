"""Mask R-CNN for K cell classes, with optional auxiliary centre and boundary heads.

The detector comes from torchvision's builders (R50-FPN, R50-FPN-v2) or, for CPU demos, from a ResNet-18 FPN
backbone. Predictors are sized for K + 1 classes (the K of ``classes`` + background; the reference's 4 + 1). Three things differ
from a stock torchvision model, each for a reason:

- :class:`CellTransform` resizes by a constant ``scale`` by default, so a cell keeps its pixel size whatever
  the image size (torchvision's min/max-size rule would blow a 40-px image up 20×). ``resize: min_max`` keeps
  torchvision's rule for reproducing the reference. Normalisation happens here, once, and nowhere else.
- The auxiliary maps travel inside the targets through exactly the same resize and padding as the image, so
  they stay aligned with the features however the images of a batch differ in size.
- :meth:`CellMaskRCNN.detect` returns the 28×28 mask probabilities unpasted: pasting every mask into a
  full-size image costs N×H×W, which ``cellseg.infer.predict`` avoids. With the heads it also returns their centre
  and boundary probabilities at the input image's pixels, for ``cellseg.infer.postproc``.
"""

from __future__ import annotations

import socket
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import ResNet18_Weights, ResNet50_Weights, resnet18
from torchvision.models.detection import (
    MaskRCNN,
    MaskRCNN_ResNet50_FPN_V2_Weights,
    MaskRCNN_ResNet50_FPN_Weights,
    maskrcnn_resnet50_fpn,
    maskrcnn_resnet50_fpn_v2,
)
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d
from torchvision.ops.poolers import initLevelMapper

from cellseg import MAP_NAMES, CellsegError
from cellseg.model import cpu_roi_align, mask_targets
from cellseg.model.safe_load import load_weights_only, read_failure
from cellseg.params import AuxParams, ModelParams

mask_targets.install()  # mask targets from the matched masks only (same values, a fraction of the memory)
cpu_roi_align.install()  # RoI pooling on CPU channels-last features as one gather (same values, ~3x faster)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_ARCH = "maskrcnn_resnet18_fpn_lite"
LITE_CHANNELS = 64


class PretrainedWeightsError(CellsegError, RuntimeError):
    """Pretrained weights could not be obtained (typically: offline and not cached)."""


# ------------------------------------------------------------------------------------------------ transform
class CellTransform(GeneralizedRCNNTransform):
    """Normalise (once), resize and batch images; resize the targets, auxiliary maps included, identically."""

    def __init__(self, params: ModelParams) -> None:
        super().__init__(params.min_size, params.max_size, IMAGENET_MEAN, IMAGENET_STD, size_divisible=32)
        self.mode = params.resize
        self.scale = params.scale

    def scale_factor(self, height: int, width: int) -> float:
        if self.mode == "scale":
            return self.scale
        return min(self.min_size[-1] / min(height, width), self.max_size / max(height, width))

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None):
        h, w = image.shape[-2:]
        factor = self.scale_factor(h, w)
        if factor != 1.0:
            image = F.interpolate(
                image[None],
                scale_factor=factor,
                mode="bilinear",
                recompute_scale_factor=True,
                align_corners=False,
            )[0]
        if target is None or factor == 1.0:
            return image, target
        size = image.shape[-2:]
        target = dict(target)
        target["boxes"] = resize_boxes(target["boxes"], (h, w), size)
        if "masks" in target:
            target["masks"] = F.interpolate(target["masks"][:, None], size=size)[:, 0]  # nearest, uint8
        if "center" in target:
            target["center"] = F.interpolate(
                target["center"][None, None], size=size, mode="bilinear", align_corners=False
            )[0, 0]
        if "boundary" in target:
            target["boundary"] = F.interpolate(target["boundary"][None, None], size=size)[0, 0]
        return image, target


def restore_to_input(
    maps: Tensor,
    padded_size: tuple[int, int],
    image_sizes: list[tuple[int, int]],
    original_sizes: list[tuple[int, int]],
) -> list[Tensor]:
    """Undo the transform on feature-level maps (``B×C×h×w`` of a padded batch): one ``C×H×W`` per input image.

    The maps are upsampled to the padded batch (each feature cell covers its stride's block of pixels), the
    padding at the bottom and right is cut off, and the resized image's pixels are resized back to the input's.
    """
    up = F.interpolate(maps, size=tuple(padded_size), mode="bilinear", align_corners=False)
    out = []
    for m, (rh, rw), (h, w) in zip(up, image_sizes, original_sizes, strict=True):
        m = m[:, :rh, :rw]
        if (rh, rw) != (h, w):
            m = F.interpolate(m[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        out.append(m)
    return out


def downsample_boundary(boundary: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """The boundary target (``B×1×H×W``) at the heads' resolution.

    ``nearest`` samples one pixel of each 4×4 block and so drops about half of a 2-px boundary band; ``max``
    keeps a block as boundary when any of its pixels is; ``area`` gives the block's boundary share (a soft
    target for the BCE).
    """
    if mode == "nearest":
        return F.interpolate(boundary, size=size, mode="nearest")
    if mode == "max":
        return F.adaptive_max_pool2d(boundary, size)
    if mode == "area":
        return F.adaptive_avg_pool2d(boundary, size)
    raise ValueError(f"unknown boundary downsampling {mode!r}")


def batch_maps(targets: list[dict[str, Tensor]], padded_size: tuple[int, int]) -> Tensor:
    """Stack each target's (resized) centre and boundary maps into ``B×2×H×W``, zero-padded at the bottom and
    right exactly as ``GeneralizedRCNNTransform.batch_images`` pads the images."""
    first = targets[0]["center"]
    out = first.new_zeros((len(targets), len(MAP_NAMES), *padded_size))
    for i, target in enumerate(targets):
        for c, key in enumerate(MAP_NAMES):
            m = target[key]
            out[i, c, : m.shape[0], : m.shape[1]] = m
    return out


# -------------------------------------------------------------------------------------------------- heads
def set_roi_scales(roi_heads: RoIHeads) -> None:
    """Give the RoI poolers the FPN's true strides instead of letting them guess from the first batch.

    torchvision's ``MultiScaleRoIAlign`` infers each level's scale on its first call, by rounding the ratio of
    the feature size to the image size, and keeps it (it is not in the state dict). A first batch of small
    images (43×44, padded to 64) rounds stride 4 to 2, and every later RoI of that model, in training and in
    inference, pools the wrong pixels. Levels '0'..'3' of every architecture here have strides 4, 8, 16 and 32.
    """
    for pool in (roi_heads.box_roi_pool, roi_heads.mask_roi_pool):
        levels = [int(name) + 2 for name in pool.featmap_names]
        pool.scales = [2.0**-level for level in levels]
        pool.map_levels = initLevelMapper(
            levels[0], levels[-1], canonical_scale=pool.canonical_scale, canonical_level=pool.canonical_level
        )


def aux_head(channels: int, hidden: int) -> nn.Sequential:
    """The reference's head: ``Conv3×3(C→hidden) + ReLU + Conv1×1(hidden→1)``, producing logits."""
    return nn.Sequential(
        nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(hidden, 1, 1)
    )


class CellMaskRCNN(nn.Module):
    """torchvision's Mask R-CNN parts (same state-dict keys) plus optional heads on the stride-4 FPN level."""

    def __init__(self, detector: MaskRCNN, transform: CellTransform, aux: AuxParams) -> None:
        super().__init__()
        self.transform = transform
        self.backbone = detector.backbone
        self.rpn = detector.rpn
        self.roi_heads = detector.roi_heads
        set_roi_scales(self.roi_heads)
        self.aux_weights = {"center": aux.w_center, "boundary": aux.w_boundary} if aux.enabled else {}
        self.boundary_downsample = aux.boundary_downsample
        if aux.enabled:
            channels = self.backbone.out_channels
            self.center_head = aux_head(channels, aux.hidden_channels)
            self.boundary_head = aux_head(channels, aux.hidden_channels)

    @property
    def has_aux(self) -> bool:
        return bool(self.aux_weights)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        """Training: a dict of losses (``loss_center``/``loss_boundary`` unweighted). Eval: ``detect``."""
        if not self.training:
            return self.detect(images)
        if targets is None:
            raise ValueError("targets are needed in training mode")
        batch, targets = self.transform(images, targets)
        features = self.backbone(batch.tensors)
        proposals, rpn_losses = self.rpn(batch, features, targets)
        _, roi_losses = self.roi_heads(features, proposals, batch.image_sizes, targets)
        losses = {**rpn_losses, **roi_losses}
        if self.has_aux:
            losses.update(self.aux_losses(features["0"], batch_maps(targets, batch.tensors.shape[-2:])))
        return losses

    def aux_losses(self, feature: Tensor, maps: Tensor) -> dict[str, Tensor]:
        """BCE of each head against its map, brought to the feature's size: centre bilinear, boundary by
        ``aux.boundary_downsample``."""
        size = feature.shape[-2:]
        center = F.interpolate(maps[:, :1], size=size, mode="bilinear", align_corners=False)
        boundary = downsample_boundary(maps[:, 1:], size, self.boundary_downsample)
        return {
            "loss_center": F.binary_cross_entropy_with_logits(self.center_head(feature), center),
            "loss_boundary": F.binary_cross_entropy_with_logits(self.boundary_head(feature), boundary),
        }

    @torch.no_grad()
    def map_losses(self, images: list[Tensor], maps: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """The heads' unweighted losses on images and their ``center``/``boundary`` target maps, as in training
        but without updating anything (call in eval mode, so batch norm keeps its statistics): the
        validation curve of the auxiliary losses."""
        targets = [{"boxes": m["center"].new_zeros((0, 4)), **m} for m in maps]
        batch, targets = self.transform(images, targets)
        features = self.backbone(batch.tensors)
        return self.aux_losses(features["0"], batch_maps(targets, batch.tensors.shape[-2:]))

    def total_loss(self, losses: dict[str, Tensor]) -> Tensor:
        """``L_maskrcnn + w_center·L_center + w_boundary·L_boundary``."""
        total = sum(v for k, v in losses.items() if k not in ("loss_center", "loss_boundary"))
        for key, weight in self.aux_weights.items():
            total = total + weight * losses[f"loss_{key}"]
        return total

    @torch.inference_mode()
    def detect(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Detections per image with boxes in input-image pixels and ``mask_probs`` (N×28×28), not pasted.

        With the heads, also ``center`` and ``boundary``: their probabilities (H×W, the input image's pixels).
        """
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        batch, _ = self.transform(images)
        features = self.backbone(batch.tensors)
        proposals, _ = self.rpn(batch, features)
        detections, _ = self.roi_heads(features, proposals, batch.image_sizes)
        for det, resized, original in zip(detections, batch.image_sizes, original_sizes, strict=True):
            det["boxes"] = resize_boxes(det["boxes"], resized, original)
            det["mask_probs"] = det.pop("masks")[:, 0]
        if self.has_aux:
            feature = features["0"]
            logits = torch.cat([self.center_head(feature), self.boundary_head(feature)], dim=1)
            restored = restore_to_input(
                logits.float(), batch.tensors.shape[-2:], batch.image_sizes, original_sizes
            )
            for det, maps in zip(detections, restored, strict=True):
                det["center"], det["boundary"] = torch.sigmoid(maps).unbind(0)
        return detections


# -------------------------------------------------------------------------------------------------- build
_COCO = {
    "maskrcnn_resnet50_fpn": MaskRCNN_ResNet50_FPN_Weights.COCO_V1,
    "maskrcnn_resnet50_fpn_v2": MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1,
}
_IMAGENET = {
    "maskrcnn_resnet50_fpn": ResNet50_Weights.IMAGENET1K_V1,
    "maskrcnn_resnet50_fpn_v2": ResNet50_Weights.IMAGENET1K_V1,
    LITE_ARCH: ResNet18_Weights.IMAGENET1K_V1,
}


def ensure_downloaded(weights, timeout_s: float = 30.0) -> Path:
    """Make sure torchvision's weights file is in the torch hub cache; download it (with a timeout) if not.

    torchvision then loads it from the cache without touching the network. Offline, this fails fast with a
    message that says where to put the file.
    """
    target = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        torch.hub.download_url_to_file(weights.url, str(target), progress=True)
    except Exception as err:
        raise PretrainedWeightsError(
            f"cannot download pretrained weights {weights.url} ({type(err).__name__}: {err}). "
            f"Offline? Download the file elsewhere and copy it to {target}, or set model.pretrained to a "
            "local weights file or to 'none'."
        ) from err
    finally:
        socket.setdefaulttimeout(previous)
    return target


def _detector(params: ModelParams, coco: bool, imagenet: bool, num_classes: int) -> MaskRCNN:
    """A torchvision Mask R-CNN for ``num_classes`` cell classes + background with the dense-scene settings of
    ``params``."""
    settings = dict(
        rpn_pre_nms_top_n_train=params.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=params.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=params.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=params.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=params.rpn_batch_size_per_image,
        box_batch_size_per_image=params.box_batch_size_per_image,
        box_detections_per_img=params.box_detections_per_img,
        box_score_thresh=params.box_score_thresh,
        box_nms_thresh=params.box_nms_thresh,
    )
    arch = params.arch
    trainable = params.trainable_layers if (coco or imagenet) else None
    if arch == LITE_ARCH:
        return _lite_detector(imagenet, params.trainable_layers if imagenet else 5, settings, num_classes)
    builder = maskrcnn_resnet50_fpn if arch == "maskrcnn_resnet50_fpn" else maskrcnn_resnet50_fpn_v2
    if coco:
        # COCO's 91-class predictors are replaced by (K + 1)-class ones, as in the reference.
        model = builder(weights=_COCO[arch], trainable_backbone_layers=trainable, **settings)
        _replace_predictors(model, num_classes)
        return model
    return builder(
        weights=None,
        weights_backbone=_IMAGENET[arch] if imagenet else None,
        num_classes=num_classes + 1,
        trainable_backbone_layers=trainable,
        **settings,
    )


def _lite_detector(imagenet: bool, trainable_layers: int, settings: dict, num_classes: int) -> MaskRCNN:
    """The CPU demo model: ResNet-18 with a 64-channel FPN and heads to match.

    The FPN, RPN and mask-head convolutions cost channels² per pixel; at 64 instead of 256 channels a CPU
    training step is about an order of magnitude cheaper. Not meant for the real dataset: use the R50 archs.
    """
    body = resnet18(
        weights=_IMAGENET[LITE_ARCH] if imagenet else None,
        norm_layer=FrozenBatchNorm2d if imagenet else nn.BatchNorm2d,
    )
    layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    layers_to_train += ["bn1"] if trainable_layers == 5 else []
    for name, parameter in body.named_parameters():
        parameter.requires_grad_(any(name.startswith(layer) for layer in layers_to_train))
    backbone = BackboneWithFPN(
        body,
        {f"layer{k}": str(k - 1) for k in range(1, 5)},
        [64, 128, 256, 512],
        LITE_CHANNELS,
        extra_blocks=LastLevelMaxPool(),
    )
    return MaskRCNN(
        backbone,
        num_classes=None,  # given by the predictors below
        box_head=TwoMLPHead(LITE_CHANNELS * 7 * 7, 256),
        box_predictor=FastRCNNPredictor(256, num_classes + 1),
        mask_head=MaskRCNNHeads(LITE_CHANNELS, [LITE_CHANNELS] * 4, 1),
        mask_predictor=MaskRCNNPredictor(LITE_CHANNELS, LITE_CHANNELS, num_classes + 1),
        **settings,
    )


def _replace_predictors(model: MaskRCNN, num_classes: int) -> None:
    box_in = model.roi_heads.box_predictor.cls_score.in_features
    model.roi_heads.box_predictor = FastRCNNPredictor(box_in, num_classes + 1)
    mask_in = model.roi_heads.mask_predictor.conv5_mask.in_channels
    model.roi_heads.mask_predictor = MaskRCNNPredictor(mask_in, 256, num_classes + 1)


def load_matching_weights(model: nn.Module, path: str | Path) -> tuple[int, list[str]]:
    """Load every tensor of a local weights file whose name and shape fit ``model``.

    Accepts a plain state dict (e.g. torchvision's COCO file for the same architecture) or a cellseg
    checkpoint (``{"model": state_dict, ...}``). Returns (loaded count, skipped names).
    """
    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(
            f"model.pretrained: {path} is not a file (use none, imagenet, coco or a path)"
        )
    try:
        state = load_weights_only(path)  # refuses a file holding more than tensors: nothing in it runs
    except CellsegError:
        raise
    except Exception as err:  # not a torch file, a truncated one
        raise PretrainedWeightsError(f"{path}: cannot read as a weights file ({read_failure(err)})") from err
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise PretrainedWeightsError(
            f"{path}: expected a state dict of tensors, found {type(state).__name__}"
        )
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not fitting:
        raise PretrainedWeightsError(f"{path}: no tensor fits model.arch (is it for another architecture?)")
    model.load_state_dict(fitting, strict=False)
    return len(fitting), sorted(set(state) - set(fitting))


def download_pretrained(params: ModelParams) -> None:
    """Put ``model.pretrained``'s torchvision weights in the cache (under torchrun: rank 0 alone, first)."""
    if params.pretrained == "coco" and params.arch in _COCO:
        ensure_downloaded(_COCO[params.arch])
    if params.pretrained == "imagenet":
        ensure_downloaded(_IMAGENET[params.arch])


def build_model(params: ModelParams, aux: AuxParams, num_classes: int) -> CellMaskRCNN:
    """The model described by ``params.yaml`` for ``num_classes`` cell classes (K, the length of ``classes``;
    the predictors have K + 1 outputs with the background); ``model.pretrained`` selects where initial weights
    come from (a file's predictors for another number of classes are skipped: they do not fit)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    source = params.pretrained
    coco, imagenet = source == "coco", source == "imagenet"
    if coco:
        if params.arch not in _COCO:
            raise PretrainedWeightsError(
                "model.pretrained=coco: torchvision has no COCO Mask R-CNN for ResNet-18"
            )
        ensure_downloaded(_COCO[params.arch])
    if imagenet:
        ensure_downloaded(_IMAGENET[params.arch])
    model = CellMaskRCNN(_detector(params, coco, imagenet, num_classes), CellTransform(params), aux)
    model.rpn.anchor_generator = AnchorGenerator(
        sizes=tuple((s,) for s in params.anchor_sizes),
        aspect_ratios=((0.5, 1.0, 2.0),) * len(params.anchor_sizes),
    )
    if source not in ("none", "coco", "imagenet"):
        like_pretrained(model, params)
        loaded, skipped = load_matching_weights(model, source)
        skipped = [k for k in skipped if not k.endswith("num_batches_tracked")]  # frozen BN keeps no count
        shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        print(
            f"model.pretrained={source}: {loaded} tensors loaded"
            + (f"; {len(skipped)} skipped (name or shape not in {params.arch}): {shown}" if skipped else "")
        )
    return model


def like_pretrained(model: CellMaskRCNN, params: ModelParams) -> None:
    """Give a model about to receive weights from a file what ``coco`` and ``imagenet`` give it: backbone
    BatchNorm frozen (R50-FPN-v2's builder keeps it trainable, so it stays) and only the last
    ``trainable_layers`` backbone stages training."""
    body = model.backbone.body
    if params.arch != "maskrcnn_resnet50_fpn_v2":
        _freeze_batchnorm(body)
    stages = ["layer4", "layer3", "layer2", "layer1", "conv1"][: params.trainable_layers]
    stages += ["bn1"] if params.trainable_layers == 5 else []
    for name, parameter in body.named_parameters():
        parameter.requires_grad_(any(name.startswith(stage) for stage in stages))


def _freeze_batchnorm(module: nn.Module) -> None:
    """Replace every ``BatchNorm2d`` below ``module`` by a ``FrozenBatchNorm2d`` with the same statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            _freeze_batchnorm(child)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def for_inference(model: CellMaskRCNN, device: torch.device | str) -> CellMaskRCNN:
    """Eval mode on ``device``; on the CPU with channels-last weights, which oneDNN convolves about 20% faster.

    For a model used only for inference (submission, folder prediction): a training loop keeps its own layout.
    """
    device = torch.device(device)
    model = model.to(device).eval()
    return model.to(memory_format=torch.channels_last) if device.type == "cpu" else model
