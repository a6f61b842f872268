"""The house's arrows point down: a sub-package imports only those below it, so no module of ``infer`` imports
``eval`` and the rule from detections to nuclei sits under everything that writes or scores nuclei."""

from __future__ import annotations

import ast

from conftest import ROOT

SRC = ROOT / "src" / "cellseg"
LAYERS = {
    "": 0,  # the top-level modules: names, params, instances, the nuclei rule, provenance ...
    "data": 1,
    "annotations": 1,
    "model": 2,
    "outputs": 2,
    "infer": 3,
    "eval": 4,
    "slide": 4,
    "train": 5,
    "importer": 5,
    "ood": 6,
    "bench": 6,
}
"""Each sub-package's level: a module may import its own package and lower levels (same-level siblings neither:
``eval`` and ``slide`` stay apart). ``cli`` and ``entry`` only name the verbs' modules (imported by name)."""


def _package(dotted: str) -> str:
    parts = dotted.split(".")
    return parts[1] if len(parts) > 2 or (SRC / parts[1]).is_dir() else ""


def _imports(path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("cellseg.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cellseg."):
            found.append((node.lineno, node.module))
    return found


def upward_imports() -> list[str]:
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        own = rel.parts[0] if len(rel.parts) > 1 else ""
        for line, dotted in _imports(path):
            target = _package(dotted)
            if target == own or target not in LAYERS:
                continue
            if LAYERS[target] > LAYERS[own] or (LAYERS[target] == LAYERS[own] and own != ""):
                bad.append(f"{rel}:{line} ({own or 'top level'}) imports {dotted} ({target})")
    return bad


def test_no_sub_package_imports_one_above_it() -> None:
    bad = upward_imports()
    assert not bad, "imports that run upward:\n" + "\n".join(bad)


def test_every_sub_package_has_a_level() -> None:
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert packages == set(LAYERS) - {""}


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch) -> None:
    """The walk is not vacuous: an ``infer`` module importing ``eval`` is reported."""
    fake = tmp_path / "cellseg"
    (fake / "infer").mkdir(parents=True)
    (fake / "eval").mkdir()
    (fake / "infer" / "__init__.py").write_text("")
    (fake / "eval" / "__init__.py").write_text("")
    (fake / "infer" / "x.py").write_text("from cellseg.eval.nuclei_metrics import score_split\n")
    monkeypatch.setattr(__import__(__name__), "SRC", fake)
    assert upward_imports() == ["infer/x.py:1 (infer) imports cellseg.eval.nuclei_metrics (eval)"]
