"""load_trained_model: round trips of checkpoints trained from scratch and from pretrained (frozen-BN)
backbones, and a clear CheckpointError for every foreign file."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torchvision.models import ResNet18_Weights, resnet18
from torchvision.ops.misc import FrozenBatchNorm2d

from cellseg.model.checkpoint import CheckpointError, load_trained_model, save_checkpoint
from cellseg.model.maskrcnn import build_model
from conftest import tiny_params

CPU = torch.device("cpu")


def _save(path: Path, params) -> torch.nn.Module:
    """A real checkpoint, as training writes it, of a freshly built model with slightly moved weights."""
    torch.manual_seed(0)
    model = build_model(params.model, params.aux, len(params.classes))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    save_checkpoint(path, model, optimizer, scheduler, scaler, 1, params, 0.5, [])
    return model.eval()


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> None:
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(a.backbone(image)["0"], b.backbone(image)["0"])
    assert a.state_dict().keys() == b.state_dict().keys()
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, msg=key)


def test_scratch_checkpoint_round_trips(tmp_path: Path) -> None:
    source = _save(tmp_path / "best.pt", tiny_params())
    model, state = load_trained_model(tmp_path / "best.pt", CPU)
    assert state["epoch"] == 1
    _same_outputs(source, model)


def test_imagenet_pretrained_checkpoint_round_trips(tmp_path: Path, monkeypatch) -> None:
    """Pretrained backbones use FrozenBatchNorm2d (no num_batches_tracked): the rebuilt model must match."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cached = tmp_path / "hub" / "checkpoints" / Path(ResNet18_Weights.IMAGENET1K_V1.url).name
    cached.parent.mkdir(parents=True)
    torch.manual_seed(2)
    torch.save(resnet18().state_dict(), cached)  # a stand-in for the ImageNet file, used without network
    params = tiny_params(model__pretrained="imagenet", model__trainable_layers=3)
    source = _save(tmp_path / "best.pt", params)
    assert isinstance(source.backbone.body.bn1, FrozenBatchNorm2d)
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("must not download"))
    model, _ = load_trained_model(tmp_path / "best.pt", CPU)
    assert isinstance(model.backbone.body.bn1, FrozenBatchNorm2d)
    _same_outputs(source, model)


def _foreign_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    params = tiny_params()
    model = build_model(params.model, params.aux, len(params.classes))
    files = {}

    def add(name: str, obj, message: str) -> None:
        torch.save(obj, tmp_path / name)
        files[name] = (tmp_path / name, message)

    add("state_dict.pt", model.state_dict(), r"not a cellseg checkpoint \(found keys \['backbone")
    add("list.pt", [1, 2], r"not a cellseg checkpoint \(found list")
    old = params.to_dict()
    del old["aux"]["hidden_channels"]  # a checkpoint of a version before this key existed
    add("old.pt", {"model": model.state_dict(), "params": old}, "written by another cellseg version")
    no_aux = params.to_dict()
    del no_aux["aux"]
    add("no_aux.pt", {"model": model.state_dict(), "params": no_aux}, "written by another cellseg version")
    other = tiny_params(aux__hidden_channels=8)  # weights of a different model than its params say
    add("mismatch.pt", {"model": model.state_dict(), "params": other.to_dict()}, "or for another model")
    (tmp_path / "text.pt").write_text("not a torch file")
    files["text.pt"] = (tmp_path / "text.pt", "cannot read as a torch file")
    (tmp_path / "pickle.pt").write_bytes(pickle.dumps({"model": 1}))
    files["pickle.pt"] = (tmp_path / "pickle.pt", "cannot read as a torch file")
    return files


def test_foreign_files_are_named_errors(tmp_path: Path) -> None:
    for name, (path, message) in _foreign_files(tmp_path).items():
        with pytest.raises(CheckpointError, match=message) as info:
            load_trained_model(path, CPU)
        assert str(info.value).startswith(str(path)), name
