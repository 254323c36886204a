# Two commands on a fresh machine (Python 3.11, Linux; no GPU, no network beyond the package index). Each installs
# what it needs on first use, into .venv/, and again whenever a requirements file changes.
#   make smoke      # the main job, offline smoke variant: train.py --config configs/smoke.yaml
#   make test-all   # the whole test suite (what CI runs); builds llama.cpp's runtime once per machine
#   make test       # the developer's loop: everything but the tests marked slow
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# llama.cpp's runtime for export tests and q4_k_m: built from its PyPI source once per machine (~4-9 min on 2 cores)
# and kept as a wheel in the cache, where export.py also keeps llama.cpp's converter.
LLAMA_CPP := llama-cpp-python==0.3.36
CACHE := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/phi2-qlora

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@

smoke: $(VENV)/.installed
	$(PY) train.py --config configs/smoke.yaml

test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

llama-runtime: $(VENV)/.installed
	@ls $(CACHE)/wheels/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || \
		$(PY) -m pip wheel -q --no-deps $(LLAMA_CPP) -w $(CACHE)/wheels
	$(PY) -m pip install -q --find-links $(CACHE)/wheels $(LLAMA_CPP)

test-all: llama-runtime
	$(PY) -m pytest -q

.PHONY: smoke test test-all llama-runtime
