"""Benchmark: training throughput of the real-data recipe's step, today's fp32 step vs the new one; and (``--plain``)
cellseg's loop vs a plain torchvision loop.

**Recipe mode** (the default): the model and data settings of ``make real-cpu`` (R18-lite FPN with the
auxiliary heads, ``model.scale`` 2, 128-px crops, batch 4, flips and 90-degree rotations), trained with
``cellseg.train.loop.train_one_epoch`` on consep-dev tiles (``--raw``; synthetic 256-px images when absent).
Two steps are compared, each in a fresh process, in the same run:

- *today*: fp32, the model as ``build_model`` returns it (what every CPU run did before issue 19);
- *new*: ``train.precision`` ``--precision`` (default bf16: autocast, fp32 master weights), the model
  as the training stage now prepares it (``for_training``: channels-last on the CPU, which also moves RoI
  pooling to ``cellseg.model.cpu_roi_align``'s gather) and the recipe's proposal counts (``RECIPE_SPEED``).

Each process trains 2 warm-up steps, then blocks of ``--steps`` steps until two consecutive blocks agree
within 10% (at most ``--max-blocks``); its figure is the mean of those two blocks. Images/s is wall time;
images per CPU-second (the process's CPU time) is printed too, since a shared machine moves wall time 2-5×
between runs. The last line is the ratio.

**Plain mode** (``--plain``): both loops train the same model (params.yaml's, auxiliary heads off: the
plain loop has no maps) on the same synthetic images (the demo dataset's generator, with larger images).
The plain loop does the work the reference's way: each item loads its whole npz and builds one full-image
mask per instance, the whole image goes through the model (no crop), fp32, and every loss component is read
back to the host. Ours is ``train_one_epoch`` over ``CellDataset`` (memory-mapped reads, ``train.crop_size``
crops, ``train.precision`` on CUDA, one host sync per step). A warm-up step, then ``--steps`` timed steps;
peak memory is the process's peak resident memory above what it held before the loop (on CUDA, also
``torch.cuda.max_memory_allocated``).

    python -m cellseg.bench.train [--raw ../shared/datasets/consep-dev] [--threads N]
    python -m cellseg.bench.train --device cuda --arch maskrcnn_resnet50_fpn_v2 --crop 512 --scale 1
    python -m cellseg.bench.train --plain [--steps 3] [--device cpu]
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
import yaml
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
    model = build_model(params.model, params.aux, len(params.classes)).to(device)
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
    prepare_dataset(
        root / "raw", root / "prepared", root / "split.json", root / "data.json", params.data, params.classes
    )
    return root / "prepared"


def plain_main(args: argparse.Namespace) -> None:
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


# ----------------------------------------------------------------------------------------------- recipe mode
RECIPE = {
    "model.arch": "maskrcnn_resnet18_fpn_lite",
    "model.scale": 2.0,
    "train.crop_size": 128,
    "train.batch_size": 4,
    "augment.hflip_p": 0.5,
    "augment.vflip_p": 0.5,
    "augment.rotate90_p": 0.5,
    "aux.enabled": True,
}
"""The Makefile's REAL_CPU model and data settings (the dataset paths and the schedule aside)."""
RECIPE_SPEED = {"model.rpn_pre_nms_top_n_train": 600, "model.rpn_post_nms_top_n_train": 300}
"""The recipe's settings chosen for speed that change what is trained (proposals per level before NMS and per
image after it, sized to the tens of nuclei a 256-px crop holds): the new step only, today's keeps
params.yaml's 2000/1000. ``--no-speed-settings`` leaves them out, to see the rest alone."""
RECIPE_TILES = 16
AGREE = 0.10
CONSEP = Path(__file__).resolve().parents[3].parent / "shared" / "datasets" / "consep-dev"


def recipe_data(root: Path, raw: Path | None, side: int = 200) -> tuple[Path, Path, str]:
    """``(train npz folder, maps folder, description)``: ``RECIPE_TILES`` consep-dev tiles (every 20th) when
    ``raw`` exists, else synthetic images of ``side`` to 1.5 × ``side`` px."""
    from cellseg.data.io import list_train_samples, read_train_sample, save_train_npz
    from cellseg.data.maps import compute_maps
    from cellseg.fsutil import save_npz

    params = load_params()
    train, maps = root / "train", root / "maps"
    train.mkdir()
    maps.mkdir()
    if raw is not None and (raw / "train").is_dir():
        samples = list_train_samples(raw, len(params.classes))
        samples = samples[:: max(1, len(samples) // RECIPE_TILES)][:RECIPE_TILES]
        what = f"{len(samples)} consep-dev tiles ({raw})"
        arrays = [(s.name, *read_train_sample(s)) for s in samples]
    else:
        synth = load_params(
            overrides={
                **SYNTH,
                "synth.n_train": RECIPE_TILES,
                "synth.min_side": side,
                "synth.max_side": side * 3 // 2,
                "synth.n_dense": 2,
                "data.val_fraction": 0.0,
            }
        )
        prepared = make_dataset_with(root / "synthetic", synth)
        arrays = []
        for path in sorted((prepared / "train").glob("*.npz")):
            loaded = load_npz(path)
            arrays.append((path.stem, loaded["image"], loaded["labels"]))
        what = f"{len(arrays)} synthetic images of {side}-{side * 3 // 2} px (no consep-dev at {raw})"
    for name, image, labels in arrays:
        save_train_npz(train / f"{name}.npz", image, labels)
        center, boundary = compute_maps(labels, params.maps.center_sigma)
        save_npz(maps / f"{name}.npz", center=center, boundary=boundary)
    return train, maps, what


def make_dataset_with(root: Path, params: Params) -> Path:
    from cellseg.data.prepare import prepare_dataset
    from cellseg.data.synth import write_dataset

    with atomic_dir(root / "raw") as tmp:
        write_dataset(tmp, params.synth)
    prepare_dataset(
        root / "raw", root / "prepared", root / "split.json", root / "data.json", params.data, params.classes
    )
    return root / "prepared"


def run_recipe(
    new: bool,
    precision: str,
    data: tuple[str, str],
    overrides: dict,
    steps: int,
    max_blocks: int,
    threads: int,
    conn,
) -> None:
    """One variant in this (fresh) process: every timed block's ``(wall s, CPU s, images)`` sent back."""
    import sys

    from cellseg.data.dataset import build_augmentation
    from cellseg.train.loop import autocast_dtype, for_training, train_one_epoch

    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - the loop's progress bar would garble the figures
    if threads > 0:
        torch.set_num_threads(threads)
    params = load_params(overrides={**overrides, "train.precision": precision})
    device = torch.device(params.train.device)
    torch.manual_seed(0)
    model = build_model(params.model, params.aux, len(params.classes))
    model = for_training(model, device) if new else model.to(device)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=params.train.lr,
        weight_decay=params.train.weight_decay,
        fused=device.type in ("cpu", "cuda"),
    )
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype(precision, device) == torch.float16)
    dataset = CellDataset(
        data[0], data[1], crop_size=params.train.crop_size, augment=build_augmentation(params.augment), seed=0
    )
    batch = params.train.batch_size

    def block(index: int, n: int) -> tuple[float, float, int]:
        dataset.set_epoch(index)  # the same crops for both variants, new ones per block
        items = [i % len(dataset) for i in range(n * batch)]
        loader = DataLoader(Subset(dataset, items), batch_size=batch, shuffle=False, collate_fn=collate)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        train_one_epoch(model, loader, optimizer, scaler, device, 0, params, DistInfo())
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - wall, time.process_time() - cpu, n * batch

    block(0, 2)  # warm-up: allocator, oneDNN/cuDNN kernels
    blocks = []
    for index in range(1, max_blocks + 1):
        blocks.append(block(index, steps))
        if len(blocks) >= 2:
            a, b = blocks[-2][0], blocks[-1][0]
            if abs(a - b) <= AGREE * max(a, b):
                break
    conn.send(blocks)
    conn.close()


def measure_recipe(new: bool, precision: str, data, overrides, steps, max_blocks, threads) -> dict:
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    args = (new, precision, data, overrides, steps, max_blocks, threads, send)
    process = ctx.Process(target=run_recipe, args=args)
    process.start()
    blocks = receive.recv()
    process.join()
    last = blocks[-2:]
    images = sum(b[2] for b in last)
    wall = [b[2] / b[0] for b in blocks]
    return {
        "images_s": images / sum(b[0] for b in last),
        "images_cpu_s": images / sum(b[1] for b in last),
        "blocks": wall,
        "agreed": len(blocks) >= 2
        and abs(blocks[-1][0] - blocks[-2][0]) <= AGREE * max(blocks[-1][0], blocks[-2][0]),
    }


def recipe_main(args: argparse.Namespace) -> None:
    overrides = {**RECIPE, "train.device": args.device}
    if args.arch:
        overrides["model.arch"] = args.arch
    if args.crop:
        overrides["train.crop_size"] = args.crop
    if args.scale:
        overrides["model.scale"] = args.scale
    for item in args.set or []:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    precision = args.precision[0] if args.precision else "bf16"
    from cellseg.train.loop import cpu_supports_bf16

    if args.device == "cpu":
        from cellseg.train.budget import cpu_isa

        onednn = os.environ.get("ONEDNN_MAX_CPU_ISA")
        print(
            f"instruction set: {cpu_isa()}{f' (ONEDNN_MAX_CPU_ISA={onednn})' if onednn else ''}; torch "
            f"{torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}"
        )
        if precision == "bf16" and not cpu_supports_bf16():
            print("note: this CPU has no native bf16 (avx512_bf16/amx_bf16): the new step trains in fp32")
    params = load_params(overrides=overrides)
    with tempfile.TemporaryDirectory() as tmp:
        train, maps, what = recipe_data(Path(tmp), args.raw, args.side)
        threads = args.threads if args.threads > 0 else torch.get_num_threads()
        print(
            f"recipe step: {params.model.arch}, scale {params.model.scale}, crop {params.train.crop_size}, "
            f"batch {params.train.batch_size}, flips + rot90, aux heads on, {args.device} ({threads} threads); "
            f"{what}; blocks of {args.steps} steps until two agree within {AGREE:.0%}; load average "
            f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
        )
        data = (str(train), str(maps))
        speed = {} if args.no_speed_settings else RECIPE_SPEED
        settings = [f"train.precision={precision}"]
        if args.device == "cpu":
            settings.append("channels-last weights (RoI pooling on cpu_roi_align's gather)")
        settings += [f"{k}={v}" for k, v in speed.items()]
        print("new step's speed settings: " + ", ".join(settings))
        rows = []
        for _ in range(args.rounds):
            effective = precision
            if args.device == "cpu" and precision == "bf16" and not cpu_supports_bf16():
                effective = "fp32 (no native bf16)"
            for new, prec, label in ((False, "fp32", "today: fp32"), (True, precision, f"new: {effective}")):
                if new and args.device == "cpu":
                    label += " + channels-last"
                if new and speed:
                    label += " + proposals"
                step_overrides = {**overrides, **speed} if new else overrides
                got = measure_recipe(
                    new, prec, data, step_overrides, args.steps, args.max_blocks, args.threads
                )
                rows.append((new, got))
                blocks = ", ".join(f"{v:.2f}" for v in got["blocks"])
                print(
                    f"{label:<34} {got['images_s']:6.2f} images/s, {got['images_cpu_s']:6.2f} images per "
                    f"CPU-second (blocks: {blocks}{'' if got['agreed'] else '; did not settle'})",
                    flush=True,
                )
    today = [g for new, g in rows if not new]
    ours = [g for new, g in rows if new]
    wall = sum(g["images_s"] for g in ours) / sum(g["images_s"] for g in today)
    cpu = sum(g["images_cpu_s"] for g in ours) / sum(g["images_cpu_s"] for g in today)
    print(f"recipe training step: {wall:.2f}× today's fp32 images/s ({cpu:.2f}× per CPU-second)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plain", action="store_true", help="cellseg's loop vs a plain torchvision loop")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per block (recipe: 4) / loop (plain: 3)"
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--arch", default=None, help="model.arch (default: the recipe's / params.yaml's)")
    parser.add_argument(
        "--crop", type=int, default=None, help="train.crop_size (default: the recipe's / params.yaml's)"
    )
    parser.add_argument("--scale", type=float, default=None, help="model.scale (recipe mode; default 2)")
    parser.add_argument(
        "--precision",
        nargs="+",
        default=None,
        help="plain: ours at each (default fp32; CUDA: fp32 fp16 bf16); recipe: the new step's (default bf16)",
    )
    parser.add_argument(
        "--raw", type=Path, default=CONSEP, help="consep-dev (recipe mode; synthetic if absent)"
    )
    parser.add_argument(
        "--side",
        type=int,
        default=200,
        help="recipe: synthetic image side when there is no --raw (e.g. 600 "
        "for 512-px crops; consep-dev tiles are 256 px)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--max-blocks", type=int, default=6, help="recipe: timed blocks at most per variant")
    parser.add_argument("--rounds", type=int, default=1, help="recipe: today/new pairs, alternated")
    parser.add_argument("--set", action="append", help="recipe: extra params override key=value (both steps)")
    parser.add_argument(
        "--no-speed-settings",
        action="store_true",
        help="recipe: the new step without RECIPE_SPEED (the recipe's proposal counts)",
    )
    args = parser.parse_args(argv)
    if args.plain:
        args.steps = args.steps or 3
        args.precision = args.precision or ["fp32"]
        plain_main(args)
    else:
        args.steps = args.steps or 4
        recipe_main(args)


if __name__ == "__main__":
    main()
