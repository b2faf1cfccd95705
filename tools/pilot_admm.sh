#!/usr/bin/env bash
# ADMM pilot of the accuracy protocol (benchmarks/PROTOCOL.md), seed 0, every step a public command on the base
# recipe recipes/bench_accuracy.yaml. Resumable: rerun the script; finished stages are up to date or adopted by hash.
# Results: the stage manifests under runs/pilot/<task>/ (dev metrics per epoch, ADMM residual and mask change per
# update); summarised in benchmarks/admm_pilot.md.
#   round 1 (RTE): the dense learning-rate grid {5e-5, 1e-4}, then rho 50 / 500 / increasing from one dense model
#       usage: tools/pilot_admm.sh [TASK] [GLUE_DIR]
#   round 2 (each table task): a middle rho, constant or increasing, from the table's seed-0 dense model
#       usage: ROUND=2 tools/pilot_admm.sh TASK [GLUE_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
TASK=${1:-rte}
GLUE=${2:-../shared/data/glue}
ROUND=${ROUND:-1}
NXM=".venv/bin/nxm-deploy -q"
W=runs/pilot/$TASK
base=(--set task.name=$TASK --set train.seed=0 --glue-dir "$GLUE")

declare -A CONFIGS=(
  # round 1
  [rho50_epoch]="--set train.admm.rho=50 --set train.admm.rho_factor=1"
  [rho500_epoch]="--set train.admm.rho=500 --set train.admm.rho_factor=1"
  [rho50x2_26steps]="--set train.admm.rho=50 --set train.admm.rho_factor=2 --set train.admm.rho_max=3200 --set train.admm.update_interval=26"
  [magnitude]="--set train.admm.method=magnitude"   # the one-shot baseline at the same 5 epochs, for reference
  # round 2: the mask may move early (rho below 500), the residual bound still holds at the end
  [rho200_epoch]="--set train.admm.rho=200 --set train.admm.rho_factor=1"
  [rho100x3_epoch]="--set train.admm.rho=100 --set train.admm.rho_factor=3"   # 100, 300, 900 over the 3 ADMM epochs
)

sparse() {  # sparse() NAME FROM_RUN: the admm stage of configuration NAME from the dense model of FROM_RUN
  [ -f "$W/$1/sparse/manifest.json" ] || \
    $NXM train recipes/bench_accuracy.yaml --stage admm --from-run "$2" --run-dir "$W/$1" \
      --set name=pilot_${TASK}_$1 ${CONFIGS[$1]} "${base[@]}"
}

if [ "$ROUND" = 1 ]; then
  # 1. dense grid (5 epochs, best dev epoch kept)
  for lr in 5.0e-5 1.0e-4; do
    [ -f "$W/dense_lr$lr/dense/manifest.json" ] || \
      $NXM train recipes/bench_accuracy.yaml --stage dense --run-dir "$W/dense_lr$lr" \
        --set name=pilot_${TASK}_dense_lr$lr --set train.dense.learning_rate=$lr "${base[@]}"
  done
  # 2. ADMM configurations (and the magnitude baseline) from the lr-5e-5 dense model
  for name in rho50_epoch rho500_epoch rho50x2_26steps magnitude; do sparse $name "$W/dense_lr5.0e-5"; done
else
  # from the table's dense model of (TASK, seed 0); rho500_epoch is round 1's choice, the incumbent of the rule
  W=runs/pilot/$TASK/round2
  for name in rho500_epoch rho200_epoch rho100x3_epoch; do sparse $name "runs/bench_accuracy/$TASK/seed0/magnitude"; done
fi
echo "pilot round $ROUND finished: $W"
