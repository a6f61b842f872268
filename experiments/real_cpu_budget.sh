#!/usr/bin/env bash
# `make real-cpu BUDGET=M` once per budget (minutes of the whole `dvc exp run`), each timed on its own and scored
# on the held-out truth: the budget curve (issue 28). One seed (SEED, default 0) per budget, as real_cpu_seeds.sh
# runs it; the runs are $OUT/budgetM-seedS (plot_budget.py draws them).
#   usage: RAW=/abs/consep-dev OUT=/abs/results [SEED=0] [MORE='-S key=value ...'] experiments/real_cpu_budget.sh M [M ...]
set -uo pipefail
for budget in "$@"; do
  BUDGET="$budget" TAG="budget$budget-" "$(dirname "$0")/real_cpu_seeds.sh" "${SEED:-0}"
done
