"""Moved: ``python -m cellseg.score`` is now ``cellseg score`` (``python -m cellseg.eval.score_results``)."""

raise SystemExit("cellseg.score moved: run `cellseg score RESULTS TRUTH_DIR MAPPING_JSON` instead")
