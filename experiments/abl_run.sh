#!/usr/bin/env bash
# One ablation run (issues 10 and 11): `dvc exp run` of the ablation base (the real-cpu recipe at 6 epochs, centre
# sigma 2) plus the given overrides, in a scratch clone; keeps the run's files and scores its submission on truth.
#   usage: RAW=/abs/consep-dev OUT=/abs/ablation experiments/abl_run.sh NAME [-S key=value ...]
#   (run from the scratch clone's root; RAW must be absolute, the queue runs elsewhere)
set -uo pipefail
name=$1; shift
: "${RAW:?set RAW to the absolute consep-dev folder}" "${OUT:?set OUT to a folder for the results}"
source "$(dirname "$0")/abl_base.sh"
mkdir -p "$OUT"
git checkout -- params.yaml
start=$(date +%s)
dvc exp run -n "$name" "${BASE[@]}" "$@" > "$OUT/$name.log" 2>&1
rc=$?
wall=$(( $(date +%s) - start ))
echo "rc=$rc wall=${wall}s" >> "$OUT/$name.log"
echo "$name rc=$rc wall=${wall}s" >> "$OUT/summary.log"
"$(dirname "$0")/abl_keep.sh" "$name"
