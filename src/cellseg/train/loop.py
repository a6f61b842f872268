"""The ``train`` stage: the optimisation loop, checkpoints, per-epoch curves and validation mAP.

Shaped after torchvision's detection references: ``train_one_epoch`` for the loop, a checkpoint holding model,
optimizer, scheduler, scaler, epoch and params, and a hard stop on a non-finite loss. Runs alone or under
``torchrun`` (DistributedDataParallel + DistributedSampler; only rank 0 writes).
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from cellseg import MAP_NAMES, CellsegError
from cellseg.data.dataset import CellDataset, build_augmentation, collate, npz_memmaps, scale_jitter
from cellseg.data.io import load_npz, visible_files
from cellseg.data.sampling import RepeatFactorSampler, check_label_rows, classes_present, repeat_factors
from cellseg.device import select_device
from cellseg.eval.score_model import nuclei_scores, score_files
from cellseg.fsutil import write_json
from cellseg.infer.detect import detect_and_select
from cellseg.model.checkpoint import (
    load_checkpoint,
    restore_scaler,
    resume_changes,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from cellseg.model.maskrcnn import CellMaskRCNN, build_model, count_parameters, download_pretrained
from cellseg.params import Params, ParamsError
from cellseg.train.budget import (
    PRE_TRAIN_PER_IMAGE,
    PRE_TRAIN_SECONDS,
    STAGE_START_SECONDS,
    TIMED_VAL_IMAGES,
    BudgetClock,
    BudgetPlan,
    checkpoint_seconds,
    cpu_isa,
    make_plan,
)
from cellseg.train.distributed import (
    DistInfo,
    barrier,
    cleanup,
    gather_objects,
    init_distributed,
    run_on_main,
    sum_across_ranks,
)

LAST, BEST = "last.pt", "best.pt"


class NonFiniteLossError(CellsegError, RuntimeError):
    """The loss became NaN or infinite; training stopped and the last good checkpoint was kept."""


@dataclass(frozen=True)
class TrainPaths:
    """Inputs and outputs of the stage (fixed by dvc.yaml)."""

    prepared: Path
    maps: Path
    models: Path
    live: Path


def seed_everything(seed: int) -> None:
    """Seed the global generators (model init, RPN/RoI sampling); data randomness has its own seeds."""
    random.seed(seed)
    torch.manual_seed(seed)


def check_inputs(params: Params, paths: TrainPaths) -> None:
    """Fail early, with the reason, before any expensive work."""
    train_files = visible_files(paths.prepared / "train", (".npz",))
    if not train_files:
        raise ParamsError(
            f"{paths.prepared / 'train'}: the training split is empty (run the prepare stage; "
            "check data.raw_dir and data.val_fraction)"
        )
    for files in (train_files[:1], visible_files(paths.prepared / "val", (".npz",))[:1]):
        for path in files:  # prepared with other `classes`: stale
            labels = npz_memmaps(path).get("labels")
            if labels is not None:  # no labels: the dataset says so
                check_label_rows(path, labels, len(params.classes))
    if params.aux.enabled and not (paths.maps / "train").is_dir():
        raise ParamsError(f"{paths.maps / 'train'}: missing; aux.enabled needs the maps stage's output")
    for folder in (paths.models, paths.live):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):  # a unique name: torchrun's ranks probe at the same time
                pass
        except OSError as err:
            raise ParamsError(f"{folder}: output directory is not writable ({err.strerror})") from err


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bfloat16 arithmetic (AVX512-BF16 or AMX), so bf16 autocast pays.

    Without it oneDNN emulates bf16 and a step gets slower, not faster. ``ATEN_CPU_CAPABILITY=avx2`` or
    ``ONEDNN_MAX_CPU_ISA=AVX2`` (how a machine with AVX-512 behaves like an AVX2-only one) count as no bf16."""
    if os.environ.get("ATEN_CPU_CAPABILITY", "").lower() in ("avx2", "default") or os.environ.get(
        "ONEDNN_MAX_CPU_ISA", ""
    ).upper() in ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` on ``device``; ``None`` means fp32.

    CUDA: fp16 or bf16 as asked. CPU: bf16 when ``precision`` is bf16 and the CPU has native bf16
    (:func:`cpu_supports_bf16`), else fp32; fp16 stays fp32 on the CPU (no fp16 arithmetic there, and the
    default ``fp16`` of params.yaml must not change what a CPU demo computes). The weights, the optimizer
    state and the loss stay fp32 under autocast (fp32 master weights); MPS trains in fp32.
    """
    if precision == "fp32" or device.type not in ("cuda", "cpu"):
        return None
    if device.type == "cpu":
        return torch.bfloat16 if precision == "bf16" and cpu_supports_bf16() else None
    return torch.float16 if precision == "fp16" else torch.bfloat16


def for_training(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` on ``device``; on the CPU with channels-last weights, which oneDNN convolves faster (the
    recipe's step: 3-5% less CPU time, ``python -m cellseg.bench.train``). The state dict keeps its names and
    shapes, so checkpoints load either way."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cpu" else model


def resolve_workers(workers: int, device: torch.device) -> int:
    """``train.workers``, where -1 means: none on CPU (the cores are busy training), on CUDA up to 6 per
    process, leaving one core to each training process."""
    if workers >= 0:
        return workers
    if device.type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_process = cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(6, per_process - 1))


def cosine_from(optimizer, epochs: int, lr: float, weight_decay: float, epoch: int):
    """A cosine schedule over ``epochs`` for ``lr``, placed at ``epoch`` (for a resume with changed values)."""
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
        group["weight_decay"] = weight_decay
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, last_epoch=epoch - 1)
    for group in optimizer.param_groups:  # the closed form: later steps continue from a point on the curve
        group["lr"] = lr * (1 + math.cos(math.pi * epoch / epochs)) / 2
    return scheduler


# ------------------------------------------------------------------------------------------------- the loop
def train_one_epoch(
    model,
    loader: DataLoader,
    optimizer,
    scaler,
    device: torch.device,
    epoch: int,
    params: Params,
    info: DistInfo,
    after_step: Callable[[], bool] | None = None,
    epochs_text: str | None = None,
) -> dict[str, float]:
    """One pass over the loader; returns the mean of every loss component and of the weighted total.

    ``after_step`` (a time budget's clock) is called after each optimiser step; ``True`` ends the pass there.

    Each step's losses are reduced over ranks before the backward pass and read back in one host sync, so a
    non-finite loss on any rank stops every rank at the same step (none is left waiting in an all-reduce).
    """
    core: CellMaskRCNN = model.module if isinstance(model, DistributedDataParallel) else model
    model.train()
    sums: dict[str, float] = {}
    steps = 0
    dtype = autocast_dtype(params.train.precision, device)
    bar = tqdm(
        loader,
        desc=f"epoch {epoch + 1}/{epochs_text or params.train.epochs}",
        unit="batch",
        disable=not info.is_main,
        leave=False,
    )
    for step, (images, targets) in enumerate(bar):
        images = [img.to(device, non_blocking=True) for img in images]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            losses = model(images, targets)
            total = core.total_loss(losses)
        names = ["loss", *losses]
        values = torch.stack([total.detach().float(), *(v.detach().float() for v in losses.values())])
        means = [v / info.world_size for v in sum_across_ranks(values, info).tolist()]  # the one host sync
        if not all(math.isfinite(v) for v in means):
            parts = ", ".join(f"{k}={v:.4g}" for k, v in zip(names[1:], means[1:], strict=True))
            raise NonFiniteLossError(
                f"epoch {epoch + 1}, step {step + 1}: loss is {means[0]} ({parts}). Training stopped; the "
                f"last good checkpoint is kept. Try a lower train.lr or a train.grad_clip > 0."
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        if params.train.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), params.train.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        steps += 1
        for key, value in zip(names, means, strict=True):
            sums[key] = sums.get(key, 0.0) + value
        bar.set_postfix(loss=f"{sums['loss'] / steps:.3f}")
        if after_step is not None and after_step():
            break
    return {k: v / max(steps, 1) for k, v in sums.items()}


def _is_eval_epoch(epoch: int, params: Params) -> bool:
    return (epoch + 1) % params.train.eval_every == 0 or epoch + 1 == params.train.epochs


def _evaluate_epoch(model: CellMaskRCNN, paths: TrainPaths, params: Params, device: torch.device) -> dict:
    """mAP on the validation split and on a fixed subset of the training split (the reference logged both),
    and the validation split's PQ and mPQ⁺."""
    results = {}
    model.eval()
    subsets = {
        "val": visible_files(paths.prepared / "val", (".npz",)),
        "train_subset": visible_files(paths.prepared / "train", (".npz",))[: params.train.train_eval_images],
    }
    for name, files in subsets.items():
        if files:
            scored = score_files(
                lambda image: detect_and_select(model, image, params.predict, device),
                files,
                params.predict.max_per_image,
                len(params.classes),
                desc=f"eval {name}",
            )
            results.update({f"{name}/map": scored.metrics["map"], f"{name}/map_50": scored.metrics["map_50"]})
            if name == "val":
                nuclei = nuclei_scores(scored, params.predict).metrics
                results.update({"val/pq": nuclei["pq"], "val/mpq_plus": nuclei["mpq_plus"]})
    if model.has_aux and subsets["val"] and (paths.maps / "val").is_dir():
        results.update(validation_map_losses(model, subsets["val"], paths.maps / "val", device))
    return results


def validation_map_losses(
    model: CellMaskRCNN, files: list[Path], maps_dir: Path, device: torch.device
) -> dict[str, float]:
    """``val/loss_center`` and ``val/loss_boundary``: the heads' losses on whole validation images (mean)."""
    model.eval()
    sums: dict[str, float] = {}
    for path in files:
        image = torch.from_numpy(load_npz(path)["image"].transpose(2, 0, 1).copy()).float().div_(255.0)
        maps = load_npz(maps_dir / path.name)
        targets = {k: torch.from_numpy(maps[k].astype("float32")).to(device) for k in MAP_NAMES}
        for key, value in model.map_losses([image.to(device)], [targets]).items():
            sums[key] = sums.get(key, 0.0) + float(value)
    return {f"val/{key}": value / len(files) for key, value in sums.items()}


def _selection_score(metrics: dict) -> float | None:
    """Best checkpoint: validation mAP@[.5:.95]; the training subset's when there is no validation split."""
    for key in ("val/map", "train_subset/map"):
        if key in metrics:
            return metrics[key]
    return None


def train(params: Params, paths: TrainPaths) -> dict:
    """Train as ``params`` says; write ``last.pt``, ``best.pt``, ``config.json`` and DVCLive curves.

    Returns the summary written to ``<models>/summary.json``.
    """
    check_inputs(params, paths)
    device = select_device(params.train.device, "train.device")
    info = init_distributed(device.type == "cuda")
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    try:
        return _train(params, paths, device, info)
    finally:
        cleanup(info)


def estimate_validation_seconds(model: CellMaskRCNN, paths: TrainPaths, params: Params, device) -> tuple:
    """``(seconds of one validation pass, seconds per predicted image)``, from the inference time of a few
    validation images (one untimed first) times the images a validation pass predicts."""
    val = visible_files(paths.prepared / "val", (".npz",))
    n_images = len(val) + min(
        params.train.train_eval_images, len(visible_files(paths.prepared / "train", (".npz",)))
    )
    sample = val[: TIMED_VAL_IMAGES + 1] or visible_files(paths.prepared / "train", (".npz",))[:2]
    model.eval()
    times = []
    for i, path in enumerate(sample):
        image = load_npz(path)["image"]
        start = time.perf_counter()
        detect_and_select(model, image, params.predict, device)
        if i or len(sample) == 1:
            times.append(time.perf_counter() - start)
    model.train()
    per_image = median(times) if times else 0.0
    return per_image * n_images * 1.1, per_image  # +10%: scoring, the heads' map losses


def _pipeline_reserve(params: Params, paths: TrainPaths, per_image: float) -> float:
    """Seconds for the stages around training in a budgeted ``dvc exp run`` (``train.budget_scope: pipeline``):
    prepare and maps before (estimated from the image count), tune, evaluate and submit after (each a process
    start and a model load, then its images at the measured inference time: tune and evaluate predict the
    validation split once each, as tune does with the default single ``tune.mask_grid`` value, submit the test
    split). The train stage does not read ``tune.*`` (a tune grid must not retrain the model), so a grid of several
    mask thresholds is not counted. The test count is read from ``data/prepared/test`` when it is there; it
    changes only this estimate, never the weights' arithmetic."""
    count = {s: len(visible_files(paths.prepared / s, (".npz",))) for s in ("train", "val", "test")}
    before = PRE_TRAIN_SECONDS + PRE_TRAIN_PER_IMAGE * sum(count.values())
    predicted = 2 * count["val"] + count["test"]
    after = 3 * STAGE_START_SECONDS + per_image * params.predict.tta_views * predicted
    return before + after


def _train(params: Params, paths: TrainPaths, device: torch.device, info: DistInfo) -> dict:
    tp = params.train
    stage_start = time.perf_counter()
    seed_everything(tp.seed + info.rank)
    run_on_main(lambda: download_pretrained(params.model), info)  # one download, not one per rank
    model = for_training(build_model(params.model, params.aux, len(params.classes)), device)
    if tp.sync_bn and info.enabled and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # fused: one kernel over all parameters (about 3x faster than the per-tensor loop on a CPU).
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=tp.lr,
        weight_decay=tp.weight_decay,
        fused=device.type in ("cpu", "cuda"),
    )
    clock = BudgetClock(tp.time_budget_min * 60.0, stage_start, tp.eval_every) if tp.time_budget_min else None
    if clock is None:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=tp.epochs)
    else:  # stepped after every optimiser step: full lr through the warm-up, then the plan's cosine
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: clock.plan.lr_factor(step) if clock.plan else 1.0
        )
    dtype = autocast_dtype(tp.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start_epoch, best_score, history = 0, -math.inf, []
    last_path, best_path = paths.models / LAST, paths.models / BEST
    if tp.resume and last_path.exists():
        state = load_checkpoint(last_path)
        schedule_changes, other_changes = resume_changes(state["params"], params, last_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best_score, history = state["epoch"] + 1, state["best_score"], state["history"]
        if (clock is None) != (state.get("budget") is None):
            raise ParamsError(
                f"{last_path}: saved by a run {'with' if clock is None else 'without'} a time budget; resume "
                "with the same train.time_budget_min (0 for an epoch count), or set train.resume=false"
            )
        if clock is not None:
            clock.restore(state["budget"])
            schedule_changes.pop("train.epochs", None)  # the plan decides the epochs
            for key in ("train.time_budget_min", "train.budget_scope"):
                if key in other_changes:
                    old, new = other_changes.pop(key)
                    print(f"resume: {key} {old} -> {new} ignored: the checkpoint's plan is kept")
        if clock is not None:
            scheduler.load_state_dict(state["scheduler"])
        elif schedule_changes:
            scheduler = cosine_from(optimizer, tp.epochs, tp.lr, tp.weight_decay, start_epoch)
        else:
            scheduler.load_state_dict(state["scheduler"])
        notes = [restore_scaler(scaler, state["scaler"])]
        rank_note = set_rng_state(state["rng"], info.rank, tp.seed)
        if rank_note:
            print(
                f"rank {info.rank}: {rank_note} (the run is no longer bit-identical to an uninterrupted one)"
            )
        if info.is_main:
            print(f"resuming from {last_path} after epoch {start_epoch}")
            lr_now = optimizer.param_groups[0]["lr"]
            for key, (old, new) in schedule_changes.items():
                print(
                    f"resume: {key} {old} -> {new}: from epoch {start_epoch + 1} the cosine schedule follows "
                    f"train.lr={tp.lr}, train.epochs={tp.epochs} (lr now {lr_now:.3g})"
                )
            for key, (old, new) in other_changes.items():
                print(f"resume: {key} {old!r} -> {new!r}: applies from epoch {start_epoch + 1}")
            for note in filter(None, notes):
                print(f"resume: {note}")
            if start_epoch >= tp.epochs:
                print(
                    f"resume: already trained {start_epoch} epochs (train.epochs={tp.epochs}): nothing to do"
                )
    else:
        if tp.resume and info.is_main:
            print(f"train.resume: no {last_path} yet, starting from scratch")
        if info.is_main:  # a fresh run must not leave a previous run's checkpoints behind
            last_path.unlink(missing_ok=True)
            best_path.unlink(missing_ok=True)

    dataset = CellDataset(
        paths.prepared / "train",
        paths.maps / "train" if params.aux.enabled else None,
        crop_size=tp.crop_size,
        augment=build_augmentation(params.augment),
        seed=tp.seed,
        **scale_jitter(params.augment),
    )
    workers = resolve_workers(tp.workers, device)
    # The shuffle order is a function of (seed, epoch) alone, so a resumed run sees the same batches.
    if tp.repeat_threshold > 0:
        factors = repeat_factors(classes_present(dataset.files, len(params.classes)), tp.repeat_threshold)
        sampler = RepeatFactorSampler(factors, info.world_size, info.rank, seed=tp.seed)
    else:
        sampler = DistributedSampler(dataset, info.world_size, info.rank, shuffle=True, seed=tp.seed)
    loader = DataLoader(
        dataset,
        batch_size=tp.batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
    )  # not persistent_workers: the workers' dataset copies must see set_epoch
    net = (
        DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if info.enabled
        else model
    )

    live = None
    if info.is_main:
        from dvclive import Live

        paths.models.mkdir(parents=True, exist_ok=True)
        write_json(paths.models / "config.json", params.to_dict())
        live = Live(str(paths.live), dvcyaml=None, save_dvc_exp=False, resume=start_epoch > 0)
        print(
            f"model {params.model.arch} (aux heads: {'on' if model.has_aux else 'off'}), "
            f"{count_parameters(model):,} parameters, {len(dataset)} training images at "
            f"{params.data.mpp} µm/px (data.mpp, saved for cellseg slide), device {device}, "
            f"precision {'fp32' if dtype is None else tp.precision}, {workers} loader workers, "
            f"{info.world_size} process{'es' if info.world_size > 1 else ''}"
        )
    plan_now = None
    if clock is not None:

        def plan_now(timed: list[float]) -> BudgetPlan:
            val_seconds, per_image = estimate_validation_seconds(model, paths, params, device)
            writes = 2 * checkpoint_seconds([model.state_dict(), optimizer.state_dict()])  # last.pt, best.pt
            reserved = _pipeline_reserve(params, paths, per_image) if tp.budget_scope == "pipeline" else 0.0
            plan = make_plan(
                clock.budget_seconds, tp.budget_scope, clock.elapsed, clock.steps_done, len(loader),
                median(timed), val_seconds, writes, reserved, tp.eval_every, cpu_isa(), str(device),
            )  # fmt: skip
            print(
                f"\nbudget {tp.time_budget_min:g} min ({tp.budget_scope}): {plan.step_seconds:.3f} s a step, "
                f"{plan.val_seconds:.1f} s a validation, {plan.reserved_seconds:.0f} s for the other stages, "
                f"{plan.elapsed_at_plan:.0f} s spent -> {plan.planned_steps} steps = {plan.planned_epochs} epochs "
                f"of {plan.steps_per_epoch} ({plan.isa})"
            )
            return plan

    epoch = start_epoch
    while clock.runs_epoch(epoch) if clock else epoch < tp.epochs:
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        if clock is not None:
            clock.begin_epoch(epoch)
            after_step = lambda: scheduler.step() or clock.after_step(plan_now)  # noqa: E731
            epochs_text = str(clock.plan.planned_epochs) if clock.plan else "?"
            losses = train_one_epoch(net, loader, optimizer, scaler, device, epoch, params, info, after_step,
                                     epochs_text)  # fmt: skip
        else:
            losses = train_one_epoch(net, loader, optimizer, scaler, device, epoch, params, info)
            scheduler.step()
        metrics = {}
        evaluate = clock.is_eval_epoch(epoch) if clock else _is_eval_epoch(epoch, params)
        if info.is_main and evaluate:
            metrics = _evaluate_epoch(model, paths, params, device)
        record = {"epoch": epoch + 1, "lr": lr, **{f"train/{k}": v for k, v in losses.items()}, **metrics}
        history.append(record)
        rngs = gather_objects(rng_state(), info)  # every rank's generators, for an exact resume
        if info.is_main:
            for key, value in record.items():
                if key != "epoch":
                    live.log_metric(key, value)
            live.next_step()
            score = _selection_score(metrics)
            improved = score is not None and score > best_score
            best_score = score if improved else best_score
            budget = clock.state() if clock else None
            save_checkpoint(
                last_path,
                model,
                optimizer,
                scheduler,
                scaler,
                epoch,
                params,
                best_score,
                history,
                rngs,
                budget,
            )
            if improved or not best_path.exists():
                save_checkpoint(
                    best_path, model, optimizer, scheduler, scaler, epoch, params, best_score, history, rngs,
                    budget,
                )  # fmt: skip
            print(_epoch_line(record))
        barrier(info)
        epoch += 1
    summary = {
        "epochs": epoch if clock else tp.epochs,
        "best_score": best_score,
        "final": history[-1] if history else {},
    }
    if clock is not None:
        summary["budget"] = clock.summary(tp.batch_size)
    if info.is_main:
        live.end()
        write_json(paths.models / "summary.json", summary)
    return summary


def _epoch_line(record: dict) -> str:
    parts = [f"epoch {record['epoch']}", f"loss {record['train/loss']:.4f}", f"lr {record['lr']:.2e}"]
    parts += [f"{k} {v:.4f}" for k, v in record.items() if k.endswith(("map_50", "/map", "/pq"))]
    return " | ".join(parts)
