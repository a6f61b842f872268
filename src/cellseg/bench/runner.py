"""``cellseg bench [NAME ...] [-- ARGS]``: run benchmarks, each in a process of its own.

A fresh process per benchmark keeps one benchmark's memory and threads out of the next one's figures (several
of them measure peak RSS). With one NAME, the arguments after it go to that benchmark.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from cellseg import CellsegError

BENCHMARKS = (
    "prepare",
    "maps",
    "metric",
    "aux",
    "tiling",
    "train",
    "postproc",
    "inference",
    "slide",
    "import",
)
"""In the order ``make bench`` runs them; ``inference`` and ``slide`` need a trained model (``make demo`` first)."""

MODULES = {"import": "importer"}
"""A benchmark whose module has another name (``import`` is a Python keyword)."""


def module_of(name: str) -> str:
    return f"cellseg.bench.{MODULES.get(name, name)}"


def main(argv: list[str] | None = None, prog: str = "cellseg bench") -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = []
    while argv and argv[0] in BENCHMARKS:
        names.append(argv.pop(0))
    if not names or (argv and len(names) != 1):
        parser = argparse.ArgumentParser(
            prog=prog,
            usage=f"{prog} [NAME ...] | {prog} NAME [options of that benchmark]",
            description="Run benchmarks; each prints its figures and a ratio against a baseline measured in "
            "the same run. Without a name, all of them in turn.",
            epilog=f"benchmarks: {', '.join(BENCHMARKS)}. `{prog} NAME --help` shows one benchmark's options.",
        )
        parser.parse_args(argv)  # --help; anything else is not a benchmark
        if argv:
            raise CellsegError(f"unknown benchmark {argv[0]!r}; choose from {', '.join(BENCHMARKS)}")
    failed = []
    for name in names or BENCHMARKS:
        print(f"== {prog} {name}", flush=True)
        if subprocess.run([sys.executable, "-m", module_of(name), *argv]).returncode != 0:
            failed.append(name)
    if failed:
        raise CellsegError(f"benchmark(s) failed: {', '.join(failed)}")
