"""Score inference-time variants of trained runs on held-out truth: thresholds, flip TTA, map-guided steps.

Why a script: the variants change only inference, so one prediction pass per run (and per TTA setting) serves
every post-processing combination; retraining per variant would cost a training each. Each run directory
holds what ``dvc exp run`` left: ``best.pt``, ``thresholds.json`` and ``params.yaml`` (``experiments/abl_run.sh``
copies them). Every variant is scored with ``cellseg.eval.score_results.score_results``, the scorer users run. ``base`` and
``tta*`` rows use the run's tuned label-score threshold, ``thr0.5`` the untuned 0.5; each post-processing
combination gets its peak and label-score thresholds tuned on the validation split (``_tune``). Each step is
scored alone, then all four, then the ones that raised validation PQ alone, together.

Usage (from the repository root, after the runs):

    python experiments/infer_variants.py RUN_DIR [RUN_DIR ...] --test-dir data/prepared/test \\
        --val-dir data/prepared/val \\
        --truth ../shared/datasets/consep-dev/test_truth \\
        --mapping ../shared/datasets/consep-dev/test_image_name_to_ids.json --out variants.json [--tta]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from cellseg.eval.nuclei_metrics import score_split
from cellseg.eval.score_model import load_labelled
from cellseg.eval.score_results import score_results
from cellseg.infer.detect import postprocess
from cellseg.infer.postproc import refine
from cellseg.infer.predict import predict_images_maps
from cellseg.infer.submit import load_test_images
from cellseg.instances import Instances
from cellseg.model.checkpoint import load_trained_model
from cellseg.model.thresholds import tuned_predict_params
from cellseg.nuclei import NucleusRule
from cellseg.params import PostprocParams, PredictParams, load_params
from cellseg.rle import to_coco_results

STEPS = ("split", "trim", "recover", "rescore")
KEPT = ("ap50_at_100", "ap", "pq", "dq", "sq", "mpq_plus", "aji", "f1", "n_pred")
PEAK_GRID = (0.1, 0.2, 0.3)  # postproc.peak_threshold (= recover_threshold), tuned on validation
# predict.label_score_threshold, tuned with it (as the tune stage does)
LABEL_GRID = (0.3, 0.4, 0.5)


def _score(rows: list[dict], truth: str, mapping: str, threshold: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "results.json"
        path.write_text(json.dumps(rows))
        metrics = score_results(path, truth, mapping, score_threshold=threshold).metrics
    return {key: metrics[key] for key in KEPT}


def _rows(found: list[Instances], tests: list) -> list[dict]:
    return [r for inst, t in zip(found, tests, strict=True) for r in to_coco_results(inst, t.image_id)]


def _refined(found: list, steps: PostprocParams | None, predict: PredictParams) -> list[Instances]:
    if steps is None:
        return [inst for inst, _ in found]
    return [postprocess(refine(inst, maps, steps), predict) for inst, maps in found]


def _tune(val: list, names: list[str], truths: list, postproc: PostprocParams | None, predict) -> tuple:
    """``(peak threshold or None, label threshold, validation PQ)`` of the best grid point for these steps."""
    best = (None, None, -1.0)
    for peak in PEAK_GRID if postproc is not None else (None,):
        steps = (
            None
            if peak is None
            else dataclasses.replace(postproc, peak_threshold=peak, recover_threshold=peak)
        )
        refined = _refined(val, steps, predict)
        for label in LABEL_GRID:
            pq = score_split(names, truths, refined, NucleusRule(label, predict.min_kept_fraction)).metrics[
                "pq"
            ]
            if pq > best[2]:
                best = (peak, label, pq)
    return best


def run_variants(
    run_dir: Path, test_dir: str, val_dir: str, truth: str, mapping: str, tta: bool, steps: bool = True
) -> list[dict]:
    """Every variant of one run: ``{"run", "variant", <KEPT figures>, thresholds, "seconds"}`` rows.

    Thresholds of the post-processing variants are tuned on the validation split (never on the test truth):
    per combination of steps, the peak threshold and the label-score threshold of highest validation PQ.
    """
    # runs made before postproc.tune_peak_grid existed lack the key; this script tunes the peak itself
    params = load_params(run_dir / "params.yaml", {"postproc.tune_peak_grid": list(PEAK_GRID)})
    device = torch.device("cpu")
    model, _ = load_trained_model(run_dir / "best.pt", device)
    predict = tuned_predict_params(params.predict, run_dir / "thresholds.json")
    tests = load_test_images(test_dir)
    val_files = sorted(Path(val_dir).glob("*.npz"))
    labelled = [load_labelled(f) for f in val_files]
    names, truths = [f.stem for f in val_files], [gt for _, gt in labelled]
    out = []

    def record(variant: str, found: list[Instances], seconds: float, label: float, **extra) -> None:
        figures = _score(_rows(found, tests), truth, mapping, label)
        out.append(
            {
                "run": run_dir.name,
                "variant": variant,
                **figures,
                "label_threshold": label,
                **extra,
                "seconds": round(seconds, 1),
            }
        )
        print(
            f"{run_dir.name:12s} {variant:28s} "
            + " ".join(f"{k}={figures[k]:.3f}" for k in KEPT[:6])
            + f" label>={label} {extra}",
            flush=True,
        )

    for views in (1, 2, 4) if tta else (1,):
        view_params = dataclasses.replace(predict, tta_views=views)
        start = time.perf_counter()
        found = list(predict_images_maps(model, (t.image for t in tests), view_params, device))
        seconds = time.perf_counter() - start
        name = "base" if views == 1 else f"tta{views}"
        record(name, [inst for inst, _ in found], seconds, predict.label_score_threshold)
        if views != 1:
            continue
        record("base thr0.5", [inst for inst, _ in found], seconds, 0.5)
        if not (steps and params.aux.enabled):
            continue
        val = list(predict_images_maps(model, (image for image, _ in labelled), predict, device))
        _, label, val_pq = _tune(val, names, truths, None, predict)
        record("none (val-tuned label)", [inst for inst, _ in found], 0.0, label, val_pq=round(val_pq, 4))
        base_val_pq = _tune(val, names, truths, None, predict)[2]
        helped = []

        def steps_variant(combo: tuple[str, ...], val=val, found=found) -> float:
            steps = dataclasses.replace(params.postproc, **{step: step in combo for step in STEPS})
            peak, label, val_pq = _tune(val, names, truths, steps, predict)
            steps = dataclasses.replace(steps, peak_threshold=peak, recover_threshold=peak)
            start = time.perf_counter()
            refined = _refined(found, steps, predict)
            seconds = time.perf_counter() - start
            record("+".join(combo), refined, seconds, label, peak=peak, val_pq=round(val_pq, 4))
            return val_pq

        for step in STEPS:  # each step alone
            if steps_variant((step,)) > base_val_pq:
                helped.append(step)
        steps_variant(STEPS)  # all of them
        if len(helped) > 1 and len(helped) < len(STEPS):
            steps_variant(tuple(helped))  # the steps that raised validation PQ alone, together
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--test-dir", required=True)
    parser.add_argument(
        "--val-dir", required=True, help="prepared validation samples (the thresholds' tuning)"
    )
    parser.add_argument("--truth", required=True)
    parser.add_argument("--mapping", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--tta", action="store_true", help="also 2 and 4 flip views (2 and 4 more passes)")
    parser.add_argument(
        "--no-steps", action="store_true", help="skip the map-guided post-processing variants"
    )
    args = parser.parse_args()
    rows = []
    for run in args.runs:
        rows += run_variants(
            run, args.test_dir, args.val_dir, args.truth, args.mapping, args.tta, not args.no_steps
        )
        args.out.write_text(json.dumps(rows, indent=1))  # each run's rows land as soon as they exist


if __name__ == "__main__":
    main()
