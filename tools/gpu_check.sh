#!/usr/bin/env bash
# The one script to run on a GPU machine: every GPU check of nxm-deploy, each result file into OUT_DIR.
#
#   tools/gpu_check.sh OUT_DIR
#
# 1. environment (nvidia-smi, torch, CUDA, cuSPARSELt)                        -> summary.txt
# 2. nxm-deploy bench-gpu for the minilm, bert-base and bert-large shape sets  -> gpu_<gpu>.json, gpu_<gpu>.md
# 3. the GPU tests (pytest -m gpu tests/gpu: kernels, CUDA runner, the tiny recipe trained and validated on CUDA)
#                                                                               -> pytest_gpu.log
# 4. recipes/gpu_sst2_small.yaml trained, exported and validated on CUDA (PyTorch CUDA 2:4 INT8 vs the ONNX Q/DQ
#    model on the full SST-2 dev set)                                          -> sst2_validation.json, sst2_report.md
# Steps 3 and 4 run side by side (their latency tables are not the benchmark: bench-gpu runs alone first).
# Logs of every step: logs.tar.gz. Exit status: the number of failed steps.
#
# Wheels the machine lacks (pydantic, polygraphy; ../shared/scripts/gpu-wheels.sh .whl) are installed from .whl/
# when present; GLUE data is read from $NXM_GLUE_DIR, else .gpu_data/glue, else ../shared/data/glue. Without the
# embedded MiniLM package, the random-init recipes take MiniLM's config and tokenizer from .gpu_data/minilm_config.
set -uo pipefail
out=${1:?usage: tools/gpu_check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" > /dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/nxm_site .whl/*.whl \
    || { echo "wheel install failed" | tee -a "$out/summary.txt"; exit 1; }
  export PYTHONPATH=/tmp/nxm_site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
glue=${NXM_GLUE_DIR:-}
[ -z "$glue" ] && for d in .gpu_data/glue ../shared/data/glue; do [ -d "$d" ] && glue=$(cd "$d" && pwd) && break; done
export NXM_GLUE_DIR=$glue
# random-init recipes need only MiniLM's config and tokenizer: a copy of them where the embedded package is missing
model_set=()
if ! "$py" -c "import importlib.util as u, sys; sys.exit(u.find_spec('all_minilm_l6_v2') is None)" 2>/dev/null \
   && [ -f .gpu_data/minilm_config/config.json ]; then
  export NXM_TINY_MODEL_SOURCE=$PWD/.gpu_data/minilm_config
  model_set=(--set "model.source=$NXM_TINY_MODEL_SOURCE")
fi
work=$(mktemp -d)
logs=$work/logs
mkdir -p "$logs"
failed=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to logs/NAME.log, one summary line
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  timeout "$limit" "$@" > "$logs/$name.log" 2>&1
  rc=$?
  echo "$name: rc=$rc in $(( $(date +%s) - start )) s (limit $limit s): $*" >> "$out/summary.txt"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
  return 0
}

{ echo "# tools/gpu_check.sh $(date -u +%FT%TZ)"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$py" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cuSPARSELt', torch.backends.cusparselt.version(), 'GPU', torch.cuda.get_device_name(0))"
  echo "glue: ${glue:-none}"; } >> "$out/summary.txt" 2>&1

# probe: one cuSPARSELt call's host cost, and whether CUDA graphs capture it (global and relaxed error modes)
step probe 30 "$py" - <<'PY'
import time, torch
from nxm_deploy.gpu.kernels import SemiSparseLinear
from nxm_deploy.sparsity import nm_mask
w = torch.randn(3072, 768, device="cuda"); w = w * nm_mask(w, "2:4"); x = torch.randn(1024, 768, device="cuda").half()
layer = SemiSparseLinear(w, None)
for label, fn in (("cslt fp16", lambda: layer._kernel(x)), ("cublas fp16", lambda: x @ w.half().t())):
    fn(); torch.cuda.synchronize(); t = []
    for _ in range(5):
        s = time.perf_counter(); fn(); torch.cuda.synchronize(); t.append(time.perf_counter() - s)
    print(f"{label}: one synchronized call {sorted(t)[2] * 1e3:.3f} ms")
for mode in ("global", "relaxed"):
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g, capture_error_mode=mode):
            y = layer._kernel(x)
        g.replay(); torch.cuda.synchronize()
        print(f"capture {mode}: ok, replay max|diff| {float((y.float() - layer._kernel(x).float()).abs().max()):.3g}")
    except Exception as exc:
        print(f"capture {mode}: failed: {str(exc).splitlines()[0][:300]}")
        torch.cuda.synchronize()
PY
cat "$logs/probe.log" >> "$out/summary.txt"

step bench "${BENCH_LIMIT:-100}" "$py" -m nxm_deploy.cli bench-gpu --shapes bert-base,minilm,bert-large --out "$out" \
  --max-seconds "${BENCH_SECONDS:-65}"
step pytest_gpu "${TEST_LIMIT:-170}" "$py" -m pytest -m gpu tests/gpu -q -rA -s -p no:cacheprovider --timeout 150 &
step sst2 "${SST2_LIMIT:-170}" "$py" -m nxm_deploy.cli run recipes/gpu_sst2_small.yaml --runs-root "$work/runs" \
  --glue-dir "$glue" "${model_set[@]}" &
wait
# the background steps ran in subshells: count their failures from the summary
failed=$(grep -c -v ': rc=0 ' <(grep ': rc=' "$out/summary.txt"))
cp "$logs/pytest_gpu.log" "$out/pytest_gpu.log" 2>/dev/null
run=$work/runs/gpu_sst2_small
cp "$run/validation.json" "$out/sst2_validation.json" 2>/dev/null
cp "$run/report.md" "$out/sst2_report.md" 2>/dev/null
tar -czf "$out/logs.tar.gz" -C "$work" logs $(cd "$work" && ls -d runs/gpu_sst2_small/*/manifest.json runs/gpu_sst2_small/diff 2>/dev/null)
echo "failed steps: $failed" >> "$out/summary.txt"
cat "$out/summary.txt"
exit "$failed"
