#!/usr/bin/env bash
# The exact commands behind docs/benchmarks.md. Run from the repository root with the peers
# environment (see docs/benchmarks.md, "Installing the peers"); each process is one command so that
# each stays under ~10 minutes on one core. Results land in runs/bench/<name>/ (git-ignored);
# the docs copy the tables and plots into docs/bench/.
set -euo pipefail
PY=${PY:-.venv-peers/bin}
BUDGETS=5,10,20,50,100,200,500,1000
for proc in ${PROCS:-vp subvp ve}; do
  "$PY/fastsde" bench --problem mixture --dim 16 --n "${N:-1000}" --processes "$proc" \
    --budgets "$BUDGETS" --no-progress --out "runs/bench/mixture16d_$proc"
done
