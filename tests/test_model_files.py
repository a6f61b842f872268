"""Model files are data: a checkpoint whose unpickling would run a command is refused by every command that reads
one, with one ``error:`` line naming it and nothing run; what cellseg saves loads with ``weights_only=True``."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import cellseg
from cellseg.data.prepare import prepare_dataset
from cellseg.fsutil import write_json
from cellseg.model.bundle import open_model
from cellseg.model.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_trained_model,
    read_checkpoint,
    save_checkpoint,
)
from cellseg.model.maskrcnn import build_model, load_matching_weights
from cellseg.model.safe_load import (
    CONVERT_COMMAND,
    NotWeightsOnlyError,
    UnsafeModelFileError,
    convert_numpy_file,
)
from cellseg.model.safe_load import (
    main as convert_main,
)
from cellseg.model.thresholds import untuned
from cellseg.provenance import provenance, sha256_file
from conftest import ROOT, make_raw_dataset, tiny_params

CPU = torch.device("cpu")


class Payload:
    """Unpickling it runs ``touch <marker>`` in a shell: what a crafted model file does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious_checkpoint(path: Path, marker: Path, legacy: bool = False) -> Path:
    """A file with every key of a cellseg checkpoint, one of them holding :class:`Payload`."""
    keys = ("model", "optimizer", "scheduler", "scaler", "epoch", "best_score", "history", "rng")
    state = {key: {} for key in keys} | {"params": Payload(marker)}
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return path


def test_the_payload_is_live_when_unpickled_the_old_way(tmp_path: Path) -> None:
    """The crafted file does run its command under ``weights_only=False``: the refusals below mean something."""
    marker = tmp_path / "ran"
    torch.load(malicious_checkpoint(tmp_path / "m.pt", marker), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_every_reader_refuses_it_and_runs_nothing(tmp_path: Path, legacy: bool) -> None:
    marker = tmp_path / "ran"
    path = malicious_checkpoint(tmp_path / "m.pt", marker, legacy)
    params = tiny_params()
    readers = {
        "load_trained_model": lambda: load_trained_model(path, CPU),
        "load_checkpoint": lambda: load_checkpoint(path),
        "read_checkpoint": lambda: read_checkpoint(path),
        "load_matching_weights": lambda: load_matching_weights(
            build_model(params.model, params.aux, len(params.classes)), path
        ),
        "convert": lambda: convert_numpy_file(path, tmp_path / "new.pt"),
        "open_model": lambda: open_model(path, params, CPU),  # every command that predicts opens it so
    }
    for name, read in readers.items():
        with pytest.raises(UnsafeModelFileError) as err:
            read()
        message = str(err.value)
        assert message.startswith(f"{path}: refused"), name
        assert "getattr" in message or "posix.system" in message, name  # what it names, unresolved
        assert "never runs code from a model file" in message, name
    assert not marker.exists()
    assert not (tmp_path / "new.pt").exists()


@pytest.mark.parametrize("verb", ["predict", "slide"])
def test_every_command_refuses_it_in_one_line(verb: str, tmp_path: Path, capsys, monkeypatch) -> None:
    """``cellseg predict`` and ``cellseg slide`` given the crafted file: one ``error:`` line, nothing run or
    written (the stages open their model the same way, through :func:`open_model`)."""
    from cellseg.cli import main

    marker = tmp_path / "ran"
    path = malicious_checkpoint(tmp_path / "m.pt", marker)
    (tmp_path / "in").mkdir()
    monkeypatch.chdir(ROOT)  # params.yaml
    args = {
        "predict": [str(path), str(tmp_path / "in"), str(tmp_path / "out")],
        "slide": [str(path), str(tmp_path / "in" / "s.tif"), "--out", str(tmp_path / "out")],
    }[verb]
    with pytest.raises(SystemExit) as exit_:
        main([verb, *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and len(err) == 1 and err[0].startswith(f"error: {path}: refused"), err
    assert not marker.exists() and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- what is saved
def _save(path: Path, history: list[dict], best_score=0.5) -> None:
    params = tiny_params()
    model = build_model(params.model, params.aux, len(params.classes))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 3)
    scaler = torch.amp.GradScaler("cpu", enabled=True)  # an fp16 run's scaler state too
    save_checkpoint(path, model, optimizer, scheduler, scaler, 1, params, best_score, history)


def test_a_checkpoint_holds_plain_data_only(tmp_path: Path) -> None:
    """numpy numbers that reach the history (a metric computed with numpy) are saved as Python numbers."""
    _save(tmp_path / "c.pt", [{"epoch": 1, "val/map": np.float64(0.25), "n": np.int64(3)}], np.float32(0.5))
    state = torch.load(tmp_path / "c.pt", map_location="cpu", weights_only=True)
    assert state["history"] == [{"epoch": 1, "val/map": 0.25, "n": 3}]
    assert type(state["history"][0]["val/map"]) is float and type(state["history"][0]["n"]) is int
    assert state["best_score"] == 0.5 and state["scaler"]["scale"] == 65536.0
    assert state["params"] == tiny_params().to_dict()
    assert isinstance(state["rng"][0]["python"], tuple) and isinstance(state["rng"][0]["torch"], torch.Tensor)
    assert load_checkpoint(tmp_path / "c.pt")["epoch"] == 1


def test_an_object_is_never_saved(tmp_path: Path) -> None:
    with pytest.raises(NotWeightsOnlyError, match=r"\['history'\]\[0\]\['when'\]: a pathlib.PosixPath"):
        _save(tmp_path / "c.pt", [{"epoch": 1, "when": Path("x")}])
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary file


def test_a_plain_file_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    torch.save({"weights": torch.zeros(2)}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=r"w.pt: not a cellseg training checkpoint \(no best_score, "):
        load_checkpoint(tmp_path / "w.pt")


# -------------------------------------------------------------------------------------- numpy-holding files
def test_a_file_with_numpy_values_is_refused_with_the_command_that_converts_it(
    tmp_path: Path, capsys
) -> None:
    old, new = tmp_path / "old.pt", tmp_path / "new.pt"
    _save(old, [{"epoch": 1, "val/map": 0.25}])
    state = torch.load(old, weights_only=True)
    state["history"][0]["val/map"] = np.float64(0.25)  # as other code, or an older version, may have saved
    state["rng"][0]["numpy"] = np.random.default_rng(0).bit_generator.state["state"]["state"]
    state["rng"][0]["legacy"] = np.random.RandomState(0).get_state()  # a tuple with a uint32 array
    torch.save(state, old)
    with pytest.raises(UnsafeModelFileError) as err:
        load_trained_model(old, CPU)
    assert str(err.value).startswith(f"{old}: refused") and "numpy" in str(err.value)
    assert f"`{CONVERT_COMMAND} {old} NEW.pt`" in str(err.value)

    convert_main([str(old), str(new)])
    assert capsys.readouterr().out.strip() == f"wrote {new}"
    converted = torch.load(new, weights_only=True)
    assert converted["history"][0]["val/map"] == 0.25
    assert converted["rng"][0]["legacy"][0] == "MT19937"
    assert torch.equal(
        converted["rng"][0]["legacy"][1], torch.from_numpy(np.random.RandomState(0).get_state()[1])
    )
    model, loaded = load_trained_model(new, CPU)
    for key, value in state["model"].items():
        assert torch.equal(model.state_dict()[key].cpu(), value), key
    assert loaded["epoch"] == 1 and not math.isnan(loaded["best_score"])


# ------------------------------------------------------------------------------------ every command, end to end
@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A working directory as dvc runs the stages in: params.yaml, a prepared split, thresholds (no training)."""
    root = tmp_path_factory.mktemp("model-files")
    params = tiny_params(aux__enabled=False)
    (root / "params.yaml").write_text(yaml.safe_dump(params.to_dict()))
    make_raw_dataset(root / "raw", n_train=3, n_test=2)
    prepare_dataset(
        root / "raw", root / "prepared", root / "split.json", root / "data.json", params.data, params.classes
    )
    write_json(root / "thresholds.json", untuned(params.predict))
    (root / "images").mkdir()
    shutil.copy(root / "raw" / "test_release" / "test-00.tif", root / "images" / "a.tif")
    return root


COMMANDS = {
    "evaluate": [
        "stages/evaluate.py",
        "{ckpt}",
        "thresholds.json",
        "prepared/val",
        "pred",
        "m.json",
        "plots",
    ],
    "submit": ["stages/submit.py", "{ckpt}", "thresholds.json", "prepared/test", "submission"],
    "tune": ["stages/tune.py", "{ckpt}", "prepared/val", "tuned.json"],
    "predict": ["stages/predict.py", "{ckpt}", "images", "out"],
    "train-resume": ["stages/train.py", "prepared", "maps", "{models}", "live"],
    "train-pretrained": ["stages/train.py", "prepared", "maps", "fresh", "live"],
    "convert": ["-m", "cellseg.model.safe_load", "{ckpt}", "converted.pt"],
}
"""Every command that reads a model file, as a user runs it (``{ckpt}``: the crafted file)."""

OVERRIDES = {"train-resume": ("train", "resume", True), "train-pretrained": ("model", "pretrained", "{ckpt}")}
"""params.yaml changes that make the train stage read the file: resuming from it, or starting from it."""


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_refuses_the_file_and_runs_nothing(workdir: Path, tmp_path: Path, command: str) -> None:
    marker, models = tmp_path / "ran", tmp_path / "models"
    models.mkdir()
    ckpt = malicious_checkpoint(models / ("last.pt" if command == "train-resume" else "best.pt"), marker)
    args = [a.format(ckpt=ckpt, models=models) for a in COMMANDS[command]]
    args = [str(ROOT / a) if a.startswith("stages/") else a for a in args]
    cwd = workdir
    if command in OVERRIDES:  # its own working directory, with its own params.yaml
        section, key, value = OVERRIDES[command]
        params = yaml.safe_load((workdir / "params.yaml").read_text())
        params[section][key] = value.format(ckpt=ckpt) if isinstance(value, str) else value
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        args = [str(workdir / a) if a in ("prepared", "maps") else a for a in args]
        cwd = tmp_path
    run = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
    assert run.stderr.startswith(f"error: {ckpt}: refused: "), run.stderr[-2000:]
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------- provenance
def test_provenance_hashes_the_whole_file_in_chunks(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 256, (3 << 20) + 17, dtype=np.uint8).tobytes()  # > 3 chunks
    (tmp_path / "m.pt").write_bytes(data)
    record = provenance(tmp_path / "m.pt", {"epoch": 4, "params": {"train": {"lr": 0.1}}})
    assert record == {
        "checkpoint": str(tmp_path / "m.pt"),
        "checkpoint_sha256": hashlib.sha256(data).hexdigest(),
        "checkpoint_bytes": len(data),
        "cellseg_version": cellseg.__version__,
        "trained_epochs": 5,
        "trained_params": {"train": {"lr": 0.1}},
    }
    assert sha256_file(tmp_path / "m.pt") == hashlib.sha256(data).hexdigest()
