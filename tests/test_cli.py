"""The `cellseg` console script: its verbs, their help, and the same figures as the modules it fronts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cellseg.cli import VERBS
from test_score import _results, truth  # noqa: F401, F811  (the fixture: hand-made nuclei in real tifs)

CELLSEG = Path(sys.executable).parent / "cellseg"


def _cellseg(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(CELLSEG), *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_help_lists_every_verb() -> None:
    out = _cellseg("--help")
    assert out.returncode == 0
    for verb in VERBS:
        assert verb in out.stdout


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_each_verb_has_help_named_after_the_command(verb: str) -> None:
    out = _cellseg(verb, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: cellseg {verb}")


def test_an_unknown_verb_names_the_valid_ones() -> None:
    out = _cellseg("frobnicate")
    assert out.returncode == 2
    assert "invalid choice: 'frobnicate'" in out.stderr and "score" in out.stderr


def test_a_user_error_is_one_line() -> None:
    out = _cellseg("score", "missing.zip", "no_truth", "no_mapping.json")
    assert out.returncode == 1
    assert out.stderr.startswith("error: ") and len(out.stderr.strip().splitlines()) == 1


def test_bench_names_are_checked_before_anything_runs() -> None:
    out = _cellseg("bench", "prepare", "maps", "--fixture", "x")
    assert out.returncode != 0 and "Traceback" not in out.stderr


def test_the_old_module_form_gives_a_one_line_hint() -> None:
    out = subprocess.run([sys.executable, "-m", "cellseg.score"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "cellseg score" in out.stderr


def test_score_gives_the_module_figures(truth: dict) -> None:  # noqa: F811
    """`cellseg score` and `python -m cellseg.eval.score_results` print the same JSON for the same files."""
    results = truth["tmp"] / "results.json"
    results.write_text(json.dumps(_results(truth)))
    truth, mapping = truth["dir"], truth["mapping"]
    via_cli = _cellseg("score", str(results), str(truth), str(mapping), "--json")
    via_module = subprocess.run(
        [
            sys.executable,
            "-m",
            "cellseg.eval.score_results",
            str(results),
            str(truth),
            str(mapping),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ},
    )
    assert via_cli.returncode == 0, via_cli.stderr
    assert json.loads(via_cli.stdout) == json.loads(via_module.stdout)
    assert 0.0 < json.loads(via_cli.stdout)["pq"] <= 1.0
