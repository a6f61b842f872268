"""Benchmark: one training step with the auxiliary centre/boundary heads against one without.

Same model weights (the plain model is the aux model minus its heads), same input, same RoI sampling seed.
The input is the real fixture sample (397×482, 161 instances) when ``../shared`` is present, else a synthetic
image of the demo dataset. Each configuration is timed as the best of ``--repeats`` steps after a warm-up, and
the heads' own share is measured separately (their forward and backward on the same stride-4 feature).

    python -m cellseg.bench.aux [--repeats 5] [--configs demo,reference]

``demo`` is params.yaml's model as it stands (the CPU demo); ``reference`` is R50-FPN with torchvision's RoI
sampling (512 per image) and the reference's 256-channel heads, on the full 397×482 image.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from cellseg import DEFAULT_CLASSES
from cellseg.data.dataset import instance_targets
from cellseg.data.io import list_train_samples, read_train_sample
from cellseg.data.maps import compute_maps
from cellseg.model.maskrcnn import CellMaskRCNN, build_model, count_parameters
from cellseg.params import Params, load_params

FIXTURE = Path(__file__).resolve().parents[4] / "shared" / "fixtures" / "hw3-sample"
CONFIGS = {
    "demo": {},
    "reference": {
        "model.arch": "maskrcnn_resnet50_fpn",
        "model.box_batch_size_per_image": 512,
        "aux.hidden_channels": 256,
    },
}


def sample() -> tuple[np.ndarray, np.ndarray, str]:
    """``(image, labels, description)``: the real fixture if available, else a dense synthetic image."""
    if (FIXTURE / "train").is_dir():
        image, labels = read_train_sample(list_train_samples(FIXTURE, len(DEFAULT_CLASSES))[0])
        return image, labels, "real fixture"
    from cellseg.data.synth import generate, plan_dataset

    spec = max(plan_dataset(load_params().synth), key=lambda s: s.height * s.width)
    image, labels = generate(spec)
    return image, labels, "synthetic"


def batch(image: np.ndarray, labels: np.ndarray, params: Params) -> tuple[list, list]:
    center, boundary = compute_maps(labels, params.maps.center_sigma)
    target = instance_targets(labels)
    target["center"] = torch.from_numpy(center)
    target["boundary"] = torch.from_numpy(boundary.astype(np.float32))
    tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float() / 255
    return [tensor], [target]


def step_time(model: CellMaskRCNN, images: list, targets: list, repeats: int) -> float:
    """Best wall time of a forward + backward + AdamW step, after one warm-up step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    times = []
    for i in range(repeats + 1):
        torch.manual_seed(i)  # the same RoI sampling for both models
        start = time.perf_counter()
        losses = model(images, targets)
        optimizer.zero_grad(set_to_none=True)
        model.total_loss(losses).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def heads_time(model: CellMaskRCNN, images: list, targets: list, repeats: int) -> float:
    """The auxiliary heads alone: forward, loss and backward on the model's own stride-4 feature."""
    from cellseg.model.maskrcnn import batch_maps

    with torch.no_grad():
        batched, out = model.transform(images, targets)
        feature = model.backbone(batched.tensors)["0"]
        maps = batch_maps(out, batched.tensors.shape[-2:])
    feature.requires_grad_(True)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        losses = model.aux_losses(feature, maps)
        (losses["loss_center"] + losses["loss_boundary"]).backward()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def run(name: str, repeats: int) -> None:
    params = load_params(overrides=CONFIGS[name])
    image, labels, source = sample()
    images, targets = batch(image, labels, params)
    torch.manual_seed(0)
    with_aux = build_model(params.model, params.aux, len(params.classes)).train()
    plain = build_model(
        params.model, load_params(overrides={**CONFIGS[name], "aux.enabled": False}).aux, len(params.classes)
    ).train()
    plain.load_state_dict(with_aux.state_dict(), strict=False)  # same weights; the plain model has no heads
    t_aux = step_time(with_aux, images, targets, repeats)
    t_plain = step_time(plain, images, targets, repeats)
    t_heads = heads_time(with_aux, images, targets, repeats)
    print(
        f"[{name}] {params.model.arch}, heads {params.aux.hidden_channels} ch, "
        f"RoIs/image {params.model.box_batch_size_per_image}, {source} {image.shape[0]}x{image.shape[1]} "
        f"({int(targets[0]['labels'].numel())} instances), {torch.get_num_threads()} threads"
    )
    print(f"  parameters: {count_parameters(plain):,} plain, {count_parameters(with_aux):,} with heads")
    print(f"  training step without heads: {t_plain:7.3f} s (best of {repeats})")
    print(f"  training step with heads:    {t_aux:7.3f} s")
    print(f"  the heads alone (fwd+bwd):   {t_heads:7.3f} s")
    print(f"  ratio with/without: {t_aux / t_plain:.3f}x (target <= 1.15x)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="training step with vs without the auxiliary heads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--configs", default="demo,reference")
    args = parser.parse_args(argv)
    for name in args.configs.split(","):
        run(name, args.repeats)


if __name__ == "__main__":
    main()
