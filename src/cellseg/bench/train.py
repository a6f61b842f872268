"""Benchmark: training throughput and peak memory, cellseg's loop vs a plain torchvision loop.

Both train the same model (params.yaml's, auxiliary heads off: the plain loop has no maps) on the same
synthetic images (the demo dataset's generator, with larger images). The plain loop does the work the
reference's way: each item loads its whole npz and builds one full-image mask per instance, the whole image
goes through the model (no crop), fp32, and every loss component is read back to the host. Ours is
``cellseg.train.loop.train_one_epoch`` over ``CellDataset`` (memory-mapped reads, ``train.crop_size`` crops,
``train.precision`` on CUDA, one host sync per step).

Each loop runs in a fresh process: a warm-up step, then ``--steps`` timed steps; peak memory is the process's
peak resident memory above what it held before the loop (on CUDA, also ``torch.cuda.max_memory_allocated``).

    python -m cellseg.bench.train [--steps 3] [--device cpu]
    python -m cellseg.bench.train --device cuda --arch maskrcnn_resnet50_fpn_v2 --crop 512 --precision fp32 bf16
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from cellseg.data.dataset import CellDataset, collate
from cellseg.data.io import load_npz
from cellseg.fsutil import atomic_dir
from cellseg.instances import Instances
from cellseg.model.maskrcnn import build_model
from cellseg.params import Params, load_params
from cellseg.train.distributed import DistInfo

BATCH = 2
IMAGES = 8
SYNTH = {
    "synth.n_train": IMAGES + 2,
    "synth.n_test": 1,
    "synth.min_side": 300,
    "synth.max_side": 700,
    "synth.n_dense": 2,
}


class PlainDataset(Dataset):
    """The reference's item: the whole npz, the whole image, one full-image uint8 mask per instance."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        arrays = load_npz(self.files[index])
        inst = Instances.from_label_rows(arrays["labels"])
        image = torch.from_numpy(arrays["image"].transpose(2, 0, 1).copy()).float() / 255.0
        masks = inst.full_masks()  # N×H×W, as the reference built them
        target = {
            "boxes": torch.from_numpy(inst.boxes_xyxy()).reshape(-1, 4),
            "labels": torch.from_numpy(inst.labels),
            "masks": torch.from_numpy(masks.astype(np.uint8)),
        }
        return image, target


def plain_steps(model, loader, optimizer, device: torch.device, steps: int) -> None:
    """torchvision's reference loop, in fp32: losses summed, every component read back for logging."""
    model.train()
    done = 0
    while done < steps:
        for images, targets in loader:
            images = [im.to(device) for im in images]
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            losses = model(images, targets)
            loss = sum(losses.values())
            logged = {k: v.item() for k, v in losses.items()}
            if not math.isfinite(loss.item()):
                raise SystemExit(f"non-finite loss {logged}")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                return


def ours_steps(model, dataset, optimizer, scaler, device: torch.device, params: Params, steps: int) -> None:
    from cellseg.train.loop import train_one_epoch

    items = [i % len(dataset) for i in range(steps * BATCH)]
    loader = DataLoader(Subset(dataset, items), batch_size=BATCH, shuffle=False, collate_fn=collate)
    train_one_epoch(model, loader, optimizer, scaler, device, 0, params, DistInfo())


def _peak_rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def run_loop(kind: str, precision: str, prepared: str, overrides: dict, steps: int, conn) -> None:
    """One loop in this (fresh) process: ``(images/s, peak RSS MB, peak CUDA MB)`` sent back."""
    import sys

    from cellseg.train.loop import autocast_dtype

    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - the loop's progress bar would garble the figures

    params = load_params(overrides={**overrides, "train.precision": precision})
    device = torch.device(params.train.device if params.train.device != "auto" else "cpu")
    torch.manual_seed(0)
    model = build_model(params.model, params.aux).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=params.train.lr)
    files = sorted(Path(prepared, "train").glob("*.npz"))[:IMAGES]
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype(precision, device) == torch.float16)
    if kind == "plain":
        loader = DataLoader(PlainDataset(files), batch_size=BATCH, shuffle=False, collate_fn=collate)

        def work(n: int) -> None:
            plain_steps(model, loader, optimizer, device, n)
    else:
        dataset = CellDataset(Path(prepared, "train"), None, crop_size=params.train.crop_size, seed=0)
        dataset.files = files

        def work(n: int) -> None:
            ours_steps(model, dataset, optimizer, scaler, device, params, n)

    work(1)  # warm-up: allocator, oneDNN/cuDNN kernels
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_kb()
    start = time.perf_counter()
    work(steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    cuda_mb = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    conn.send((steps * BATCH / seconds, (_peak_rss_kb() - before) / 1024, cuda_mb))
    conn.close()


def measure(
    kind: str, precision: str, prepared: Path, overrides: dict, steps: int
) -> tuple[float, float, float]:
    ctx = multiprocessing.get_context("spawn")  # a clean process per loop: no memory or threads carried over
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=run_loop, args=(kind, precision, str(prepared), overrides, steps, send))
    process.start()
    result = receive.recv()
    process.join()
    return result


def make_dataset(root: Path) -> Path:
    """Synthetic images of 300–700 px in the demo dataset's format, prepared (train split only)."""
    from cellseg.data.prepare import prepare_dataset
    from cellseg.data.synth import write_dataset

    params = load_params(overrides={**SYNTH, "data.val_fraction": 0.0})
    with atomic_dir(root / "raw") as tmp:
        write_dataset(tmp, params.synth)
    prepare_dataset(root / "raw", root / "prepared", root / "split.json", root / "data.json", params.data)
    return root / "prepared"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per loop (batch size 2)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--arch", default=None, help="model.arch (default: params.yaml's)")
    parser.add_argument("--crop", type=int, default=None, help="train.crop_size (default: params.yaml's)")
    parser.add_argument(
        "--precision", nargs="+", default=["fp32"], help="ours at each (CUDA: fp32 fp16 bf16)"
    )
    args = parser.parse_args(argv)
    overrides = {"aux.enabled": False, "train.device": args.device, "train.batch_size": BATCH}
    if args.arch:
        overrides["model.arch"] = args.arch
    if args.crop:
        overrides["train.crop_size"] = args.crop
    params = load_params(overrides=overrides)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = make_dataset(Path(tmp))
        files = sorted((prepared / "train").glob("*.npz"))[:IMAGES]
        sides = [load_npz(f)["image"].shape[:2] for f in files]
        print(
            f"{params.model.arch} on {args.device}, batch {BATCH}, {len(files)} synthetic images of "
            f"{min(min(s) for s in sides)}–{max(max(s) for s in sides)} px; ours crops {params.train.crop_size} px"
        )
        plain = measure("plain", "fp32", prepared, overrides, args.steps)
        print(
            f"plain torchvision loop (full images, full masks, fp32): {plain[0]:6.2f} images/s, peak RSS "
            f"{plain[1]:7.0f} MB" + (f", peak CUDA {plain[2]:.0f} MB" if args.device == "cuda" else "")
        )
        best = None
        for precision in args.precision:
            ours = measure("ours", precision, prepared, overrides, args.steps)
            print(
                f"cellseg loop ({precision}):                              {ours[0]:6.2f} images/s, peak RSS "
                f"{ours[1]:7.0f} MB" + (f", peak CUDA {ours[2]:.0f} MB" if args.device == "cuda" else "")
            )
            best = ours if best is None or ours[0] > best[0] else best
    memory = plain[2] / best[2] if args.device == "cuda" else plain[1] / max(best[1], 1.0)
    print(
        f"training throughput: {best[0] / plain[0]:.1f}× the plain loop's images/s; peak memory {memory:.1f}× less"
    )


if __name__ == "__main__":
    main()
