#!/usr/bin/env bash
# The one script to run on a GPU machine: every GPU check of nxm-deploy, each result file into OUT_DIR.
#
#   tools/gpu_check.sh OUT_DIR
#
# 1. environment (nvidia-smi, torch, CUDA, cuSPARSELt) and a probe: the host cost of one cuSPARSELt call, and
#    whether CUDA graphs record it and a BERT forward                            -> summary.txt
# 2. the kernel and CUDA-runner tests (tests/gpu/test_cuda_kernels.py), alone  -> pytest_kernels.log
# 3. nxm-deploy bench-gpu for the bert-base, minilm and bert-large shape sets, alone
#                                                                               -> gpu_<gpu>.json, gpu_<gpu>.md
# 4. side by side (their latency tables are not the benchmark):
#    - the tiny recipe trained and validated on CUDA, and a short bench-gpu (pytest -m gpu) -> pytest_gpu.log
#    - recipes/gpu_sst2_small.yaml trained, exported and validated on CUDA (PyTorch CUDA 2:4 INT8 vs the ONNX
#      Q/DQ model on the full SST-2 dev set)                                    -> sst2_validation.json, sst2_report.md
# 3b. where the end-to-end time goes: tools/profile_gpu_e2e.py (kernels per variant) -> summary.txt
# STEPS="probe bench ..." runs only the named steps (probe pytest_kernels bench profile pytest_gpu sst2).
# About 10 minutes at most (each step has a time limit; see the *_LIMIT variables below).
# Logs of every step: logs.tar.gz. Exit status: the number of failed steps.
#
# tools/gpu_prepare.sh makes .whl/ and .gpu_data/ on the CPU machine (carry both). Wheels the machine lacks
# (pydantic, polygraphy) are installed from .whl/
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
  if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then return 0; fi
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

# probe: one cuSPARSELt call's host cost (both output layouts), and whether CUDA graphs record it and a BERT forward
step probe 40 "$py" - <<'PY'
import time, torch, transformers
from nxm_deploy.gpu.graphs import GraphedForward, hf_forward
from nxm_deploy.gpu.kernels import SemiSparseLinear
from nxm_deploy.sparsity import nm_mask
w = torch.randn(3072, 768, device="cuda"); w = w * nm_mask(w, "2:4"); x = torch.randn(1024, 768, device="cuda").half()
layer = SemiSparseLinear(w, None)
s8 = SemiSparseLinear(w, None, input_scale=x.float().abs().amax() / 127, weight_scale=w.abs().amax(1) / 127)
calls = {"cslt fp16 transpose_result": lambda: layer._kernel(x),
         "cslt fp16 plain": lambda: torch._cslt_sparse_mm(layer.packed, x.t()),
         "cslt int8 transpose_result": lambda: s8._kernel(x), "cublas fp16": lambda: x @ w.half().t()}
for label, fn in calls.items():
    fn(); torch.cuda.synchronize(); t = []
    for _ in range(3):
        s = time.perf_counter(); fn(); torch.cuda.synchronize(); t.append(time.perf_counter() - s)
    print(f"{label}: one synchronized call {sorted(t)[1] * 1e3:.3f} ms")
for mode in ("global", "relaxed"):
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g, capture_error_mode=mode):
            y = s8._kernel(x)
        g.replay(); torch.cuda.synchronize()
        print(f"capture {mode} (int8 layer): ok, replay max|diff| {float((y.float() - s8._kernel(x).float()).abs().max()):.3g}")
    except Exception as exc:
        print(f"capture {mode} (int8 layer): failed: {str(exc).splitlines()[0][:300]}"); torch.cuda.synchronize()
config = transformers.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
model = transformers.BertForSequenceClassification(config).cuda().eval()
ids = torch.randint(0, 1000, (4, 32), device="cuda"); mask = torch.ones_like(ids)
for label, fn in (("2-D mask", lambda **kw: model(**kw).logits), ("4-D mask (hf_forward)", hf_forward(model, "logits", torch.float32))):
    graphed = GraphedForward(fn)
    with torch.no_grad():
        graphed(input_ids=ids, attention_mask=mask)
    print(f"BERT forward, {label}: capture error {graphed.capture_error}")
print("transformers", transformers.__version__)
PY
[ -f "$logs/probe.log" ] && cat "$logs/probe.log" >> "$out/summary.txt"
step pytest_kernels "${KERNEL_LIMIT:-90}" "$py" -m pytest tests/gpu/test_cuda_kernels.py -q -rA -s -p no:cacheprovider --timeout 60
cp "$logs/pytest_kernels.log" "$out/pytest_kernels.log" 2>/dev/null

step bench "${BENCH_LIMIT:-150}" "$py" -m nxm_deploy.cli bench-gpu --shapes bert-base,minilm,bert-large --out "$out" \
  --max-seconds "${BENCH_SECONDS:-120}"
# where the end-to-end time goes (kernels of one eager forward per variant), after the timings, alone
step profile "${PROFILE_LIMIT:-90}" "$py" tools/profile_gpu_e2e.py --shapes bert-base --batch 32 --seq 128
[ -f "$logs/profile.log" ] && cat "$logs/profile.log" >> "$out/summary.txt"
step pytest_gpu "${TEST_LIMIT:-270}" "$py" -m pytest -m gpu tests/gpu/test_cuda_pipeline.py tests/gpu/test_gpu_bench.py -q -rA -s \
  -p no:cacheprovider --timeout 250 &
step sst2 "${SST2_LIMIT:-270}" "$py" -m nxm_deploy.cli run recipes/gpu_sst2_small.yaml --runs-root "$work/runs" \
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
