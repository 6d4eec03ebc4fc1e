# Two entry points: `make demo` and `make test`. Each builds the virtual environment it needs at .venv
# and reuses it when its marker file says it is complete (the marker is older than pyproject.toml => rebuild).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip --disable-pip-version-check

.PHONY: demo test gpu-check clean-venv browser

demo: $(VENV)/.demo-ready
	$(PY) jobs/caption.py --config configs/demo.toml

test: $(VENV)/.test-ready browser
	$(PY) -m pytest -q

# Headless Chromium (Debian's package) for the test that renders the run report; installed once, as root or
# through sudo.
browser:
	@command -v chromium >/dev/null || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# On a machine with CUDA: the GPU tests (bf16 logits vs transformers, compile on/off, refill/static) and the GPU
# benchmark (GLM-4.1V-9B shapes, random weights). Fails without CUDA rather than skipping silently.
# GPU_PYTHON=python3: use a Python that already has a CUDA torch and the test packages instead of building .venv
# (a GPU machine that cannot download; see bench/gpu_check.sh).
gpu-check: $(if $(GPU_PYTHON),,$(VENV)/.test-ready)
	bash bench/gpu_check.sh $(or $(GPU_PYTHON),$(PY))

# The run-time environment: the small CPU build of torch from the local wheel cache. A complete test
# environment is a superset of it, so it is reused as is; a torch already there (a stale test environment's
# 2.14.1) is kept, since putting 2.13.0 under its torchvision breaks the tests' imports.
$(VENV)/.demo-ready: pyproject.toml
	@if [ -f $(VENV)/.test-ready ] && [ $(VENV)/.test-ready -nt pyproject.toml ]; then touch $@; else \
	  set -e; [ -x $(PY) ] || $(PYTHON) -m venv $(VENV); \
	  $(PY) -c 'import torch' 2>/dev/null || $(PIP) install -q torch==2.13.0; \
	  $(PIP) install -q -e .; \
	  touch $@; fi

# The test environment: torch 2.14.1 + torchvision 0.29.1 (transformers' video processor needs torchvision,
# and PyPI's torchvision does not import beside 2.13.0), plus the reference implementation and moto.
$(VENV)/.test-ready: pyproject.toml
	@set -e; [ -x $(PY) ] || $(PYTHON) -m venv $(VENV); \
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1; \
	$(PIP) install -q -e '.[test]'; \
	touch $@

clean-venv:
	rm -rf $(VENV)
