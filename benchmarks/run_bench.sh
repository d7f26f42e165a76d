#!/usr/bin/env bash
# The exact commands behind the 16-D mixture and digits tables of docs/benchmarks/which-solver.md and
# docs/benchmarks/adaptive.md. Run from the repository root with the peers environment (see
# docs/benchmarks/index.md, "Installing the peers"). Results land in runs/bench/<name>/
# (git-ignored); the docs copy the merged tables, CSVs and plots into docs/bench/.
# On the 2-core development machine each mixture piece took 20-40 min and the digits run ~40 min.
# Pick parts with e.g. PARTS="mixture karras" PROCS="vp" benchmarks/run_bench.sh
set -euo pipefail
PY=${PY:-.venv-peers/bin}
PARTS=${PARTS-mixture seed1 pi pc2m karras digits}
N=${N:-10000}
DET_BUDGETS=5,6,8,10,12,15,20,25,30,40,50,70,100,200,500
STOCH_BUDGETS=8,10,12,15,20,25,30,40,50,70,100,150,200,300,500
STOCH_TOLS=0.2,0.14,0.1,0.07,0.05,0.035,0.025,0.018,0.012,0.008,0.005,0.003,0.002
DET=euler,heun,ddim,dpmpp_2m,ode,kdiff_euler,kdiff_heun,kdiff_dpmpp_2m,kdiff_dpm_adaptive_eta0,diffusers_ddim,diffusers_dpmsolver_2m,diffusers_unipc,diffusers_euler,scipy_rk45,torchdiffeq_dopri5
STOCH=em,pc,ancestral,reverse_diffusion,ddim_eta1,adaptive,adaptive_sde_dpm,dpmpp_2m_sde,kdiff_dpmpp_2m_sde,kdiff_dpm_adaptive_eta1,torchsde_srk,torchsde_milstein
MIX=(--problem mixture --dim 16 --n "$N" --no-progress)

# An adaptive sampler swept over tolerances on seed 0 and (except EDM) seed 1: runs/bench/<prefix>_<P>, <prefix>_seed1_<P>.
adaptive_seeds01() {
  "$PY/fastsde" bench "${MIX[@]}" --processes "$1" --budgets "$STOCH_BUDGETS" --tolerances "$STOCH_TOLS" \
    --samplers "$2" --out "runs/bench/$3_$1"
  if [ "$1" != edm ]; then
    "$PY/fastsde" bench "${MIX[@]}" --processes "$1" --seed 1 --budgets "$STOCH_BUDGETS" --tolerances "$STOCH_TOLS" \
      --samplers "$2" --out "runs/bench/$3_seed1_$1"
  fi
}

for part in $PARTS; do
  case $part in
  mixture)  # every sampler, deterministic and stochastic pieces, pooled per process
    for P in ${PROCS-vp subvp ve edm}; do
      "$PY/fastsde" bench "${MIX[@]}" --processes "$P" --budgets "$DET_BUDGETS" --samplers "$DET" \
        --out "runs/bench/det10k_$P"
      "$PY/fastsde" bench "${MIX[@]}" --processes "$P" --budgets "$STOCH_BUDGETS" --tolerances "$STOCH_TOLS" \
        --samplers "$STOCH" --out "runs/bench/stoch10k_$P"
      "$PY/fastsde" bench --merge "runs/bench/det10k_$P" "runs/bench/stoch10k_$P" --out "runs/bench/mix10k_$P"
      if [ "$P" = edm ]; then  # the log-SNR grid variants differ from the defaults only on EDM
        "$PY/fastsde" bench "${MIX[@]}" --processes edm --budgets "$STOCH_BUDGETS" \
          --samplers dpmpp_2m_logsnr,dpmpp_2m_sde_logsnr --out runs/bench/logsnr10k_edm
        "$PY/fastsde" bench --merge runs/bench/mix10k_edm runs/bench/logsnr10k_edm --out runs/bench/all10k_edm
      fi
    done ;;
  seed1)  # a second noise seed for the deciding stochastic samplers
    for P in ${PROCS-vp subvp ve}; do
      "$PY/fastsde" bench "${MIX[@]}" --processes "$P" --seed 1 --budgets "$STOCH_BUDGETS" --tolerances "$STOCH_TOLS" \
        --samplers em,adaptive_sde_dpm,dpmpp_2m_sde,kdiff_dpmpp_2m_sde,kdiff_dpm_adaptive_eta1 \
        --out "runs/bench/stoch10k_seed1_$P"
    done ;;
  pi)  # adaptive_sde_dpm with PI step control (pi_beta 0.35), seeds 0 and 1 (docs/benchmarks/adaptive.md)
    for P in ${PROCS-vp subvp ve edm}; do adaptive_seeds01 "$P" adaptive_sde_dpm_pi pi10k; done ;;
  pc2m)  # adaptive_sde_dpm_2m, seeds 0 and 1; seeds 2 and 3 with the peer (docs/benchmarks/adaptive.md)
    for P in ${PROCS-vp subvp ve edm}; do
      adaptive_seeds01 "$P" adaptive_sde_dpm_2m pc2m10k
      if [ "$P" = vp ] || [ "$P" = ve ]; then
        for S in 2 3; do
          "$PY/fastsde" bench "${MIX[@]}" --processes "$P" --seed $S --budgets "$STOCH_BUDGETS" --tolerances "$STOCH_TOLS" \
            --samplers adaptive_sde_dpm_2m,kdiff_dpmpp_2m_sde,dpmpp_2m_sde_pc --out "runs/bench/rep_${P}_s$S"
        done
      fi
    done ;;
  karras)  # fastsde's 2M solvers on the peers' Karras grid: grid against method
    "$PY/fastsde" bench "${MIX[@]}" --processes vp --budgets "$STOCH_BUDGETS" \
      --samplers dpmpp_2m_karras,dpmpp_2m_sde_karras --out runs/bench/karras10k_vp
    "$PY/fastsde" bench --problem digits --n 1000 --budgets 10,20,50 --no-progress \
      --samplers dpmpp_2m_karras,dpmpp_2m_sde_karras --out runs/bench/digits1k_karras ;;
  digits)  # the shipped digits model (medium VP); merged with the Karras variants when present
    "$PY/fastsde" bench --problem digits --n 1000 --budgets 10,20,50 --tolerances 0.1,0.05,0.02 \
      --samplers em,pc,euler,heun,ddim,dpmpp_2m,dpmpp_2m_sde,ode,adaptive,adaptive_sde_dpm,kdiff_dpmpp_2m,kdiff_heun,kdiff_dpm_adaptive_eta0,kdiff_dpm_adaptive_eta1,kdiff_dpmpp_2m_sde,diffusers_dpmsolver_2m,diffusers_unipc,scipy_rk45 \
      --no-progress --out runs/bench/digits1k
    if [ -d runs/bench/digits1k_karras ]; then
      "$PY/fastsde" bench --merge runs/bench/digits1k runs/bench/digits1k_karras --out runs/bench/digits1k_all
    fi
    "$PY/python" benchmarks/digits_sde_seeds.py --n 1000 --nfe 50 --seeds 0,1,2,3,4,5 ;;
  *) echo "unknown part $part (expected mixture, seed1, pi, pc2m, karras, digits)" >&2; exit 2 ;;
  esac
done
