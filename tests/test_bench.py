"""Benchmarks run in any clone: without ../shared they fall back to synthetic demo data and say so."""

from __future__ import annotations

from pathlib import Path

import pytest

import cellseg.bench.maps as bench_maps
import cellseg.bench.prepare as bench_prepare
from cellseg.bench.runner import BENCHMARKS, module_of


def test_prepare_falls_back_to_a_demo_sample(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setattr(bench_prepare, "FIXTURE", tmp_path / "no-shared" / "sample-image")
    bench_prepare.main(["--repeats", "1"])
    out = capsys.readouterr().out
    assert "real fixture not found" in out and "synthetic demo sample" in out
    assert "identical targets: True" in out and "speed-up:" in out


def test_maps_falls_back_to_a_synthetic_scene(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setattr(bench_maps, "FIXTURE", tmp_path / "no-shared")
    bench_maps.main(["--fixture", str(tmp_path / "no-shared")])
    out = capsys.readouterr().out
    assert "fixture not found" in out


def test_every_benchmark_module_exists_and_has_a_main() -> None:
    import importlib

    for name in BENCHMARKS:
        assert callable(importlib.import_module(module_of(name)).main), name


@pytest.mark.slow
def test_the_import_benchmark_runs_and_reports_its_ratio(capsys) -> None:
    import cellseg.bench.importer as bench_import

    bench_import.main(["--nuclei", "300", "1200"])
    out = capsys.readouterr().out
    assert "1200 nuclei" in out and "written in" in out and "nuclei/s" in out
    assert "peak RSS 1200 / 300 nuclei = " in out.splitlines()[-1]
