#!/usr/bin/env bash
# `make gpu-check`: one script, at most 8 minutes, for a machine lent with a GPU. Prints its figures:
#   1. `cellseg bench train` on CUDA: fp32 vs bf16 step, R50-FPN-v2, 512-px crops (model.scale 1) of synthetic
#      600-900 px images (consep-dev tiles are only 256 px), 3 min max;
#   2. a 2-process NCCL smoke test when 2 GPUs exist (skipped, with the reason, otherwise), 1 min max;
#   3. a short real-data run when RAW holds the dataset: prepare, maps, 2 epochs of R50-FPN-v2 in bf16,
#      tune, evaluate (3.5 min max), in a scratch copy of the project: the workspace and dvc are untouched.
# Usage: experiments/gpu_check.sh [RAW]   (default RAW: ../shared/datasets/consep-dev)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
RAW=${1:-../shared/datasets/consep-dev}
START=$(date +%s)

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu-check: no CUDA GPU visible to torch ($("$PY" -c 'import torch; print(torch.__version__)')):" \
       "this check needs a GPU machine" >&2
  exit 2
fi
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
"$PY" -c 'import torch; print("gpu-check:", torch.cuda.device_count(), "x", torch.cuda.get_device_name(0), "torch", torch.__version__)'

echo "== 1. bench train on CUDA (R50-FPN-v2, 512-px crops, fp32 vs bf16)"
timeout 180 "$PY" -m cellseg.bench.train --device cuda --arch maskrcnn_resnet50_fpn_v2 --crop 512 --scale 1 \
  --precision bf16 --steps 5 --raw none --side 600 || echo "bench train: failed or over 3 min (rc $?)"

echo "== 2. NCCL smoke test"
if [ "$GPUS" -ge 2 ]; then
  timeout 60 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 experiments/nccl_smoke.py \
    || echo "nccl smoke test: FAILED (rc $?)"
else
  echo "nccl smoke test: skipped ($GPUS GPU)"
fi

echo "== 3. short real-data run"
if [ -d "$RAW/train" ]; then
  RAW_ABS=$(cd "$RAW" && pwd)
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
  cp -r stages params.yaml "$WORK"/
  "$PY" - "$WORK/params.yaml" "$RAW_ABS" <<'PYEOF'
import sys, yaml
path, raw = sys.argv[1], sys.argv[2]
p = yaml.safe_load(open(path))
p["data"].update(raw_dir=raw, group_regex=r"^(train_[0-9]+)_")
p["model"].update(arch="maskrcnn_resnet50_fpn_v2", pretrained="none")
p["train"].update(device="cuda", precision="bf16", epochs=2, eval_every=2, crop_size=256, batch_size=8,
                  train_eval_images=0, workers=-1)
p["predict"].update(device="cuda")
yaml.safe_dump(p, open(path, "w"), sort_keys=False)
PYEOF
  (
    cd "$WORK"
    set -x
    timeout 210 bash -c "
      $PY stages/prepare.py \"$RAW_ABS\" data/prepared data/split.json metrics/data.json &&
      $PY stages/maps.py data/prepared data/maps plots/maps &&
      $PY stages/train.py data/prepared data/maps models metrics/train &&
      $PY stages/tune.py models/best.pt data/prepared/val models/thresholds.json &&
      $PY stages/evaluate.py models/best.pt models/thresholds.json data/prepared/val data/predictions \
        metrics/eval.json plots/eval metrics/eval_per_image.csv --maps data/maps/val"
  ) || echo "short real-data run: failed or over 3.5 min (rc $?)"
  if [ -f "$WORK/metrics/eval.json" ]; then
    "$PY" -c "import json,sys; m=json.load(open(sys.argv[1])); print('short real-data run (2 epochs, val):', {k: round(m[k], 3) for k in ('map_50', 'pq', 'mpq_plus') if k in m})" "$WORK/metrics/eval.json"
    "$PY" -c "import json,sys; t=json.load(open(sys.argv[1])); print('thresholds:', {k: t[k] for k in ('label_score_threshold', 'label_score_threshold_per_class') if k in t})" "$WORK/models/thresholds.json"
  fi
else
  echo "short real-data run: skipped (no $RAW/train; pass RAW=...)"
fi
echo "gpu-check: done in $(( $(date +%s) - START )) s"
