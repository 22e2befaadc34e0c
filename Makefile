# The README's two commands. Each creates .venv from the repo's own files.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: quickstart test venv

$(BIN)/host: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0 -e '.[test,release,logging]'
	# deepspeed is an sdist whose setup imports torch; DS_BUILD_OPS=0 compiles no CUDA ops (CPU CI)
	$(BIN)/pip install -q setuptools wheel && DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation 'deepspeed>=0.16'
	touch $(BIN)/host

venv: $(BIN)/host

quickstart: venv
	@for p in $$(scripts/plugins-of examples/quickstart.yaml); do $(BIN)/pip install -q -e plugins/$$p; done
	HF_HUB_OFFLINE=1 $(BIN)/python examples/make_tiny_moe.py
	HF_HUB_OFFLINE=1 $(BIN)/host train examples/quickstart.yaml

test: venv
	bash scripts/test-all.sh
