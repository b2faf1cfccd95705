#!/usr/bin/env bash
# ADMM pilot of the accuracy protocol (benchmarks/PROTOCOL.md): on one task and seed 0, the dense learning-rate grid
# {5e-5, 1e-4}, then ADMM configurations from the same dense model, each a public command on the base recipe
# recipes/bench_accuracy.yaml. Resumable: rerun the script; finished stages are up to date or adopted by hash.
# Results: the stage manifests under runs/pilot/<task>/ (dev metrics per epoch, ADMM residual per update);
# summarised by hand in benchmarks/admm_pilot.md.
#   usage: tools/pilot_admm.sh [TASK] [GLUE_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
TASK=${1:-rte}
GLUE=${2:-../shared/data/glue}
NXM=".venv/bin/nxm-deploy -q"
W=runs/pilot/$TASK
base=(--set task.name=$TASK --set train.seed=0 --glue-dir "$GLUE")

# 1. dense grid (5 epochs, best dev epoch kept)
for lr in 5.0e-5 1.0e-4; do
  [ -f "$W/dense_lr$lr/dense/manifest.json" ] || \
    $NXM train recipes/bench_accuracy.yaml --stage dense --run-dir "$W/dense_lr$lr" \
      --set name=pilot_${TASK}_dense_lr$lr --set train.dense.learning_rate=$lr "${base[@]}"
done

# 2. ADMM configurations (and the magnitude baseline) from the lr-5e-5 dense model (the table's, unless the grid says otherwise)
declare -A CONFIGS=(
  [rho50_epoch]="--set train.admm.rho=50"
  [rho500_epoch]="--set train.admm.rho=500"
  [rho50x2_26steps]="--set train.admm.rho=50 --set train.admm.rho_factor=2 --set train.admm.rho_max=3200 --set train.admm.update_interval=26"
  [magnitude]="--set train.admm.method=magnitude"   # the one-shot baseline at the same 5 epochs, for reference
)
for name in rho50_epoch rho500_epoch rho50x2_26steps magnitude; do
  [ -f "$W/$name/sparse/manifest.json" ] || \
    $NXM train recipes/bench_accuracy.yaml --stage admm --from-run "$W/dense_lr5.0e-5" --run-dir "$W/$name" \
      --set name=pilot_${TASK}_$name --set train.dense.learning_rate=5.0e-5 ${CONFIGS[$name]} "${base[@]}"
done
echo "pilot finished: $W"
