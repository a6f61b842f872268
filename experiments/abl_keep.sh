#!/usr/bin/env bash
# Keep the workspace's run as $OUT/NAME (checkpoint, thresholds, params, metrics, submission) and score its
# submission on the held-out truth at its tuned label-score thresholds -> $OUT/NAME/test.json (per class when tuned) and
# $OUT/NAME/test_global.json (the global one).
#   usage: RAW=/abs/consep-dev OUT=/abs/ablation experiments/abl_keep.sh NAME   (from the scratch clone's root)
set -euo pipefail
name=$1
mkdir -p "$OUT/$name"
cp -r submission metrics models/best.pt models/thresholds.json models/config.json params.yaml "$OUT/$name/"
for ood in data/ood plots/ood; do  # the out-of-domain sets' per-image rows and pictures (issue 31), when scored
  if [ -d "$ood" ]; then mkdir -p "$OUT/$name/$(dirname "$ood")" && cp -r "$ood" "$OUT/$name/$ood"; fi
done
thr=$(python -c "import json; print(json.load(open('models/thresholds.json'))['label_score_threshold'])")
# label maps at the thresholds file's thresholds (what evaluate and cellseg predict use) -> test.json, and at the
# one global threshold -> test_global.json: the per-class thresholds' effect on the same model
cellseg score submission/submission.zip "$RAW/test_truth" "$RAW/test_image_name_to_ids.json" \
  --thresholds models/thresholds.json --json > "$OUT/$name/test.json"
cellseg score submission/submission.zip "$RAW/test_truth" "$RAW/test_image_name_to_ids.json" \
  --score-threshold "$thr" --json > "$OUT/$name/test_global.json"
echo "$name thr=$thr" >> "$OUT/summary.log"
