#!/usr/bin/env bash
# The exact commands behind docs/benchmarks.md. Run from the repository root with the peers
# environment (see docs/benchmarks.md, "Installing the peers"); each process is one command so that
# each stays under ~10 minutes on one core. Results land in runs/bench/<name>/ (git-ignored);
# the docs copy the tables and plots into docs/bench/.
set -euo pipefail
PY=${PY:-.venv-peers/bin}
BUDGETS=5,6,8,10,12,15,20,25,30,40,50,70,100,200,500,1000
for proc in ${PROCS-vp subvp ve}; do
  "$PY/fastsde" bench --problem mixture --dim 16 --n "${N:-1000}" --processes "$proc" \
    --budgets "$BUDGETS" --no-progress --out "runs/bench/mixture16d_$proc"
done
# The shipped digits model (the medium VP model), small n and budgets: its score costs ~0.1-0.2 s
# per call of 256 rows on one CPU core.
if [ -n "${DIGITS:-}" ]; then
  "$PY/fastsde" bench --problem digits --n 256 --budgets 10,20,50 --tolerances 0.1,0.05,0.02 \
    --samplers em,pc,euler,heun,ddim,dpmpp_2m,ode,adaptive,adaptive_sde_dpm,kdiff_dpmpp_2m,kdiff_heun,kdiff_dpm_adaptive_eta0,kdiff_dpm_adaptive_eta1,kdiff_dpmpp_2m_sde,diffusers_dpmsolver_2m,diffusers_unipc,scipy_rk45 \
    --no-progress --out runs/bench/digits
fi
