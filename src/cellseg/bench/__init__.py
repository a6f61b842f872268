"""Benchmarks: `cellseg bench <name>` (or `python -m cellseg.bench.<name>`) prints its figures and ratios."""
