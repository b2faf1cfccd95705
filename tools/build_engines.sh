#!/usr/bin/env bash
# Build TensorRT engines from engine specs: every engines/*.yaml, or the specs given.
#
#   tools/build_engines.sh                                   # every spec, each from its run_dir
#   tools/build_engines.sh engines/minilm_mrpc_sparse_int8.yaml --run-dir runs/my_run
#   tools/build_engines.sh --force --layers                  # rebuild; print each engine's check
#
# Same code path as `nxm-deploy build-engine --spec ...`; prints a summary table. Safe to run several at
# once on one run directory: one lock per engine, atomic writes, a locked timing cache, and an engine that
# is up to date (same spec, ONNX, TensorRT version, GPU SM) is not rebuilt.
#
# Exit codes: 0 built or up to date; 2 bad spec or input; 3 no TensorRT or no GPU on this machine (one line
# says what is missing and how to install nxm-deploy[trt]); 4 a build failed; 5 a post-build check failed.
# PYTHON overrides the interpreter (default: .venv/bin/python when present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi

specs=()
opts=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --run-dir) opts+=("$2"); shift 2 ;;   # the run directory: build-engine's positional target
    -*) opts+=("$1"); shift ;;
    *) specs+=("$1"); shift ;;
  esac
done
if [[ ${#specs[@]} -eq 0 ]]; then
  shopt -s nullglob
  specs=(engines/*.yaml)
fi
if [[ ${#specs[@]} -eq 0 ]]; then
  echo "error: no engine specs (engines/*.yaml is empty)" >&2
  exit 2
fi

spec_args=()
for spec in "${specs[@]}"; do spec_args+=(--spec "$spec"); done
exec "$PY" -m nxm_deploy.cli build-engine "${opts[@]+"${opts[@]}"}" "${spec_args[@]}"
