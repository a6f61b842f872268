#!/usr/bin/env bash
# The reference's weight sweep w_center = w_boundary ∈ {0, 0.1, 0.2, 1.0} through the DVC queue (issue 11), at the
# ablation base (abl_base.sh), seed 0 (w = 0.5 is the default: abl_run.sh heads_s0 -S train.seed=0); then each
# experiment is applied and its submission scored on truth.
#   usage: RAW=/abs/consep-dev OUT=/abs/ablation experiments/abl_sweep.sh   (from the scratch clone's root)
set -uo pipefail
: "${RAW:?set RAW to the absolute consep-dev folder}" "${OUT:?set OUT to a folder for the results}"
source "$(dirname "$0")/abl_base.sh"
BASE+=(-S train.seed=0)
WEIGHTS=(0 0.1 0.2 1.0)
mkdir -p "$OUT"
git checkout -- params.yaml
for w in "${WEIGHTS[@]}"; do
  dvc exp run --queue -n "sweep_w$w" "${BASE[@]}" -S aux.w_center=$w -S aux.w_boundary=$w
done
start=$(date +%s)
dvc queue start -j 1
# The status is read whole first: grep -q would close the pipe early, and pipefail would end the wait. A worker
# that finds the queue momentarily idle between tasks exits (seen with DVC 3.67), so one with tasks still queued
# and none running is restarted.
until status=$(dvc queue status) && ! grep -qE 'Queued|Running' <<< "$status"; do
  if ! grep -q 'Running' <<< "$status"; then
    sleep 30
    grep -q 'Running' <<< "$(dvc queue status)" || dvc queue start -j 1
  fi
  sleep 30
done
echo "sweep queue wall=$(( $(date +%s) - start ))s" >> "$OUT/summary.log"
dvc exp show --md --only-changed > "$OUT/exp_show.md"
for w in "${WEIGHTS[@]}"; do
  name=sweep_w$w
  git checkout -- params.yaml
  dvc exp apply "$name" || { echo "$name: apply failed" >> "$OUT/summary.log"; continue; }
  "$(dirname "$0")/abl_keep.sh" "$name"
done
