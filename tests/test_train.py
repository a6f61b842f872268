"""The training loop: outputs, resume after an interruption, the non-finite-loss stop, input checks, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import cellseg.train.loop as train_module
from cellseg.model.checkpoint import load_checkpoint
from cellseg.model.maskrcnn import CellMaskRCNN
from cellseg.params import ParamsError
from cellseg.train.loop import BEST, LAST, NonFiniteLossError, TrainPaths, train
from conftest import ROOT, tiny_params


def _paths(project: dict, out: Path) -> TrainPaths:
    return TrainPaths(project["prepared"], project["maps"], out / "models", out / "live")


def test_outputs_of_a_training_run(tiny_project: dict) -> None:
    models, live = tiny_project["models"], tiny_project["live"]
    for name in (BEST, LAST, "config.json", "summary.json"):
        assert (models / name).is_file()
    state = load_checkpoint(models / LAST)
    assert set(state) >= {"model", "optimizer", "scheduler", "scaler", "epoch", "params", "rng", "history"}
    assert state["params"] == tiny_project["params"].to_dict()
    record = state["history"][-1]
    for key in (
        "train/loss",
        "train/loss_mask",
        "train/loss_center",
        "train/loss_boundary",
        "lr",
        "val/map",
        "val/map_50",
        "val/loss_center",
        "val/loss_boundary",
        "train_subset/map",
        "train_subset/map_50",
        "val/pq",
        "val/mpq_plus",
    ):
        assert key in record, key
    logged = json.loads((live / "metrics.json").read_text())
    assert logged["val"]["map_50"] == pytest.approx(record["val/map_50"])
    rows = (live / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["step", "loss"] and len(rows) == 1 + len(state["history"])


@pytest.mark.slow
def test_resume_after_an_interruption_gives_the_uninterrupted_result(
    tiny_project: dict, tmp_path: Path, monkeypatch
) -> None:
    params = tiny_params(train__epochs=3, train__eval_every=3)
    train(params, _paths(tiny_project, tmp_path / "straight"))

    real_epoch = train_module.train_one_epoch

    def interrupted(model, loader, optimizer, scaler, device, epoch, *args):
        if epoch == 2:
            raise KeyboardInterrupt  # killed during the third epoch
        return real_epoch(model, loader, optimizer, scaler, device, epoch, *args)

    monkeypatch.setattr(train_module, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(params, _paths(tiny_project, tmp_path / "resumed"))
    assert load_checkpoint(tmp_path / "resumed" / "models" / LAST)["epoch"] == 1
    monkeypatch.setattr(train_module, "train_one_epoch", real_epoch)
    train(
        tiny_params(train__epochs=3, train__eval_every=3, train__resume=True),
        _paths(tiny_project, tmp_path / "resumed"),
    )

    straight = load_checkpoint(tmp_path / "straight" / "models" / LAST)
    resumed = load_checkpoint(tmp_path / "resumed" / "models" / LAST)
    assert resumed["epoch"] == straight["epoch"] == 2
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    for key, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=0, msg=key)
    assert resumed["history"][-1]["val/map"] == straight["history"][-1]["val/map"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("first", "then"), [(False, True), (True, False)], ids=["fp32-then-amp", "amp-then-fp32"]
)
def test_resume_across_precision_settings(
    tiny_project: dict, tmp_path: Path, monkeypatch, first: bool, then: bool
) -> None:
    """A run resumed with mixed precision switched (a checkpoint from a CPU run continued on a GPU, or back) goes on.

    On the CPU, AMP is forced here the way CUDA gets it: an enabled GradScaler, hence bfloat16 autocast."""
    real_scaler = torch.amp.GradScaler
    amp = {"on": first}
    monkeypatch.setattr(
        torch.amp, "GradScaler", lambda device, enabled: real_scaler("cpu", enabled=amp["on"])
    )
    paths = _paths(tiny_project, tmp_path)
    small = {"train__crop_size": 64, "train__train_eval_images": 0, "train__eval_every": 5}
    train(tiny_params(train__epochs=1, **small), paths)
    assert bool(load_checkpoint(paths.models / LAST)["scaler"]) == first  # empty when saved without AMP
    amp["on"] = then
    train(tiny_params(train__epochs=2, train__resume=True, **small), paths)
    state = load_checkpoint(paths.models / LAST)
    assert state["epoch"] == 1 and [h["epoch"] for h in state["history"]] == [1, 2]
    assert bool(state["scaler"]) == then
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    tiny_project: dict, tmp_path: Path, monkeypatch
) -> None:
    real_total = CellMaskRCNN.total_loss
    calls = {"n": 0}

    def exploding(self, losses):
        calls["n"] += 1
        total = real_total(self, losses)
        return total * float("nan") if calls["n"] > 2 else total  # 2 batches per epoch: NaN in epoch 2

    monkeypatch.setattr(CellMaskRCNN, "total_loss", exploding)
    paths = _paths(tiny_project, tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 1: loss is nan .*loss_mask=.*train.lr"):
        train(tiny_params(train__epochs=3, train__eval_every=5), paths)
    state = load_checkpoint(paths.models / LAST)
    assert state["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_inputs_are_checked_before_training(tiny_project: dict, tmp_path: Path) -> None:
    params = tiny_params()
    empty = tmp_path / "prepared"
    (empty / "train").mkdir(parents=True)
    with pytest.raises(ParamsError, match="the training split is empty"):
        train(params, TrainPaths(empty, tiny_project["maps"], tmp_path / "m", tmp_path / "l"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ParamsError, match="a-file/models: output directory is not writable"):
        train(
            params,
            TrainPaths(tiny_project["prepared"], tiny_project["maps"], blocker / "models", tmp_path / "l"),
        )
    with pytest.raises(ParamsError, match="aux.enabled needs the maps stage"):
        train(
            params, TrainPaths(tiny_project["prepared"], tmp_path / "nomaps", tmp_path / "m", tmp_path / "l")
        )


@pytest.mark.slow
def test_distributed_training_with_two_cpu_processes(tiny_project: dict, tmp_path: Path) -> None:
    """train.nproc=2: the stage script launches torchrun itself (gloo on CPU), trains with DDP, only rank 0
    writes, and the checkpoint holds both ranks' random states."""
    params = tiny_params(train__epochs=2, train__nproc=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        str(ROOT / "stages" / "train.py"),
        str(tiny_project["prepared"]),
        str(tiny_project["maps"]),
        "models",
        "live",
    ]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "2 processes" in run.stdout
    assert run.stdout.count("epoch 2 |") == 1  # one writer
    state = load_checkpoint(tmp_path / "models" / LAST)
    assert state["epoch"] == 1 and len(state["history"]) == 2
    assert len(state["rng"]) == 2  # one random state per rank
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    assert not any(
        k.startswith("module.") for k in state["model"]
    )  # the bare model is saved, not the DDP wrapper


def test_autocast_dtype_on_cpu_and_cuda(monkeypatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(train_module, "cpu_supports_bf16", lambda: True)
    assert train_module.autocast_dtype("bf16", cpu) == torch.bfloat16
    assert train_module.autocast_dtype("fp16", cpu) is None  # the yaml default: a CPU demo stays fp32
    assert train_module.autocast_dtype("fp32", cpu) is None
    assert train_module.autocast_dtype("fp16", cuda) == torch.float16
    assert train_module.autocast_dtype("bf16", cuda) == torch.bfloat16
    assert train_module.autocast_dtype("bf16", torch.device("mps")) is None
    monkeypatch.setattr(train_module, "cpu_supports_bf16", lambda: False)
    assert train_module.autocast_dtype("bf16", cpu) is None  # emulated bf16 would be slower


def test_bf16_on_a_cpu_keeps_fp32_weights_and_resumes_in_fp32(
    tiny_project: dict, tmp_path: Path, monkeypatch
) -> None:
    """train.precision=bf16 on a CPU: autocast in bf16 (forced here on any CPU), fp32 master weights in the
    checkpoint, no loss scale; the run then resumes at fp32."""
    monkeypatch.setattr(train_module, "cpu_supports_bf16", lambda: True)
    seen = []
    real_autocast = torch.autocast

    def spy(device_type, dtype=None, enabled=True, **kwargs):
        seen.append((device_type, dtype, enabled))
        return real_autocast(device_type, dtype=dtype, enabled=enabled, **kwargs)

    monkeypatch.setattr(torch, "autocast", spy)
    paths = _paths(tiny_project, tmp_path)
    small = {"train__crop_size": 64, "train__train_eval_images": 0, "train__eval_every": 5}
    train(tiny_params(train__epochs=1, train__precision="bf16", **small), paths)
    assert ("cpu", torch.bfloat16, True) in seen
    state = load_checkpoint(paths.models / LAST)
    assert not state["scaler"]
    weights = [v for v in state["model"].values() if v.is_floating_point()]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights)
    train(tiny_params(train__epochs=2, train__resume=True, train__precision="fp32", **small), paths)
    assert load_checkpoint(paths.models / LAST)["epoch"] == 1


@pytest.mark.parametrize(("name", "value"), [("ATEN_CPU_CAPABILITY", "avx2"), ("ONEDNN_MAX_CPU_ISA", "AVX2")])
def test_a_cpu_told_to_behave_like_avx2_has_no_bf16(monkeypatch, name: str, value: str) -> None:
    """How the AVX2 path is measured on a machine with AVX-512: bf16 autocast must then fall back to fp32 too."""
    monkeypatch.setenv(name, value)
    assert not train_module.cpu_supports_bf16()
    assert train_module.autocast_dtype("bf16", torch.device("cpu")) is None
