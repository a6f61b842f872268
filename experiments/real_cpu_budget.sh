#!/usr/bin/env bash
# `make real-cpu BUDGET=M` once per budget (minutes of the whole `dvc exp run`), each timed on its own and scored
# on the held-out truth: the budget curve (issue 28).
#   usage: RAW=/abs/consep-dev OUT=/abs/results [MORE='-S key=value ...'] experiments/real_cpu_budget.sh M [M ...]
#   Run it from the root of a scratch clone with nothing else running on the machine. Each budget's run is kept
#   in $OUT/budgetM (abl_keep.sh: checkpoint, thresholds, metrics, models/summary.json with the plan, test.json).
set -uo pipefail
export PATH="$PWD/.venv/bin:$PATH"  # cellseg, for abl_keep.sh
: "${RAW:?set RAW to the absolute consep-dev folder}" "${OUT:?set OUT to a folder for the results}"
mkdir -p "$OUT"
for budget in "$@"; do
  name="budget$budget"
  git checkout -- params.yaml
  start=$(date +%s)
  make real-cpu RAW="$RAW" BUDGET="$budget" EXTRA="${MORE:-}" > "$OUT/$name.log" 2>&1
  rc=$?
  wall=$(( $(date +%s) - start ))
  isa=$(grep -ow -E 'avx512_bf16|avx512f|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')
  echo "$name rc=$rc wall=${wall}s isa=[$isa]${MORE:+ more=$MORE}" | tee -a "$OUT/summary.log"
  if [ "$rc" -eq 0 ]; then
    OUT="$OUT" RAW="$RAW" "$(dirname "$0")/abl_keep.sh" "$name"
    cp models/summary.json "$OUT/$name/summary.json"
  fi
done
