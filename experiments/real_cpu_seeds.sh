#!/usr/bin/env bash
# `make real-cpu` once per seed, each timed on its own and scored on the held-out truth (issue 19's check).
#   usage: RAW=/abs/consep-dev OUT=/abs/results [MORE='-S key=value ...'] experiments/real_cpu_seeds.sh SEED [SEED ...]
#   MORE: overrides on top of the recipe for every seed (an ablation at equal epochs, e.g. the recipe before a change)
#   BUDGET: the recipe's minutes (make real-cpu BUDGET=...; default the Makefile's), TAG: a prefix of the runs' names
#   SHARED: the absolute ../shared of the main checkout (its out-of-domain sets; a scratch clone has none beside it)
#   Run it from the root of a scratch clone with nothing else running on the machine: each seed is one
#   `dvc exp run` of the Makefile's REAL_CPU recipe plus `-S train.seed=SEED`; its wall time is the whole run
#   (prepare -> submit), and abl_keep.sh keeps its files in $OUT/seedN and writes $OUT/seedN/test.json.
set -uo pipefail
export PATH="$PWD/.venv/bin:$PATH"  # cellseg, for abl_keep.sh
: "${RAW:?set RAW to the absolute consep-dev folder}" "${OUT:?set OUT to a folder for the results}"
mkdir -p "$OUT"
for seed in "$@"; do
  name="${TAG:-}seed$seed"
  git checkout -- params.yaml
  start=$(date +%s)
  make real-cpu RAW="$RAW" ${BUDGET:+BUDGET=$BUDGET} ${SHARED:+SHARED=$SHARED} EXTRA="-S train.seed=$seed ${MORE:-}" \
    > "$OUT/$name.log" 2>&1
  rc=$?
  wall=$(( $(date +%s) - start ))
  isa=$(grep -ow -E 'avx512_bf16|avx512f|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')
  echo "$name rc=$rc wall=${wall}s isa=[$isa]${MORE:+ more=$MORE}" | tee -a "$OUT/summary.log"
  if [ "$rc" -eq 0 ]; then
    OUT="$OUT" RAW="$RAW" "$(dirname "$0")/abl_keep.sh" "$name"
    cp models/summary.json "$OUT/$name/summary.json"
  fi
done
