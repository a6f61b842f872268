"""Benchmarks: each module runs with `python -m cellseg.bench.<name>` and prints its figures and ratios."""
