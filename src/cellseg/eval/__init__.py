"""Evaluation: COCO AP and the nuclei metrics, scoring a model or a results file, tuning, reports and plots."""
