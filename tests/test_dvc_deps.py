"""dvc.yaml lists exactly what each stage reads: every cellseg module its script imports (derived here from the
source, transitively), and only the data splits it uses, so a change reruns the stages it affects and no others."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

SRC = ROOT / "src"
DVC = {  # a foreach stage's template (``do``) stands for all of its stages
    name: stage.get("do", stage)
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items()
}


def _module_file(dotted: str) -> Path | None:
    """The source file of a cellseg module, or None when ``dotted`` names something else (a function)."""
    base = SRC.joinpath(*dotted.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported_modules(path: Path) -> set[str]:
    """The cellseg modules ``path`` imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "cellseg"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "cellseg":
            found.add(node.module)
            found |= {
                f"{node.module}.{a.name}" for a in node.names if _module_file(f"{node.module}.{a.name}")
            }
    for dotted in list(found):  # importing cellseg.a.b runs cellseg/__init__.py and cellseg/a/__init__.py
        parts = dotted.split(".")
        found |= {".".join(parts[:i]) for i in range(1, len(parts))}
    return found


def stage_code(script: Path) -> set[str]:
    """Every file a stage script runs: itself and the cellseg modules it imports, transitively."""
    files, todo = {script}, [script]
    while todo:
        for dotted in _imported_modules(todo.pop()):
            path = _module_file(dotted)
            if path is not None and path not in files:
                files.add(path)
                todo.append(path)
    return {p.relative_to(ROOT).as_posix() for p in files}


def _script(stage: dict) -> Path:
    (script,) = re.findall(r"python (stages/\S+\.py)", stage["cmd"])
    return ROOT / script


def listed_code(deps: list[str]) -> set[str]:
    """The source files a stage's code deps name: files as they are, a folder as every ``.py`` file under it."""
    files = set()
    for dep in deps:
        if not dep.startswith(("src/", "stages/")):
            continue
        path = ROOT / dep
        found = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        files |= {p.relative_to(ROOT).as_posix() for p in found}
    return files


@pytest.mark.parametrize("name", sorted(DVC))
def test_every_imported_module_is_a_dependency(name: str) -> None:
    """A folder dep is allowed only when the stage runs every module in it: no stage depends on code it does
    not run, so an edit reruns exactly the stages that run the edited module."""
    stage = DVC[name]
    code = stage_code(_script(stage))
    listed = listed_code(stage["deps"])
    assert not code - listed, f"{name}: add to deps in dvc.yaml: {sorted(code - listed)}"
    assert not listed - code, f"{name}: deps that the stage does not run: {sorted(listed - code)}"


def test_a_folder_dep_counts_every_module_under_it() -> None:
    assert listed_code(["src/cellseg/model"]) == {
        "src/cellseg/model/__init__.py",
        "src/cellseg/model/bundle.py",
        "src/cellseg/model/checkpoint.py",
        "src/cellseg/model/cpu_roi_align.py",
        "src/cellseg/model/mask_targets.py",
        "src/cellseg/model/maskrcnn.py",
        "src/cellseg/model/safe_load.py",
        "src/cellseg/model/thresholds.py",
    }
    assert listed_code(["data/prepared/val", "stages/train.py"]) == {"stages/train.py"}


def test_training_does_not_run_inference_or_evaluation_code() -> None:
    """Editing post-processing, the tune stage or the exports must never retrain the model."""
    code = stage_code(ROOT / "stages" / "train.py")
    for module in (
        "infer/postproc.py",
        "infer/predict.py",
        "model/thresholds.py",
        "eval/tune.py",
        "eval/report.py",
    ):
        assert f"src/cellseg/{module}" not in code


def test_the_derivation_follows_imports_transitively() -> None:
    code = stage_code(ROOT / "stages" / "train.py")
    assert {"src/cellseg/__init__.py", "src/cellseg/entry.py", "src/cellseg/params.py"} <= code  # direct
    assert {
        "src/cellseg/model/maskrcnn.py",
        "src/cellseg/data/io.py",
        "src/cellseg/fsutil.py",
    } <= code  # through train.py


@pytest.mark.parametrize("name", ["maps", "train"])
def test_training_stages_do_not_depend_on_the_test_split(name: str) -> None:
    """A new test set must not rebuild the maps or retrain the model: only train/ and val/ are read."""
    deps = set(DVC[name]["deps"])
    assert "data/prepared" not in deps
    assert {"data/prepared/train", "data/prepared/val"} <= deps
