# Two commands on a fresh machine (Python 3.11, Linux; no GPU, no network beyond the package index). Each installs
# what it needs on first use, into .venv/, and again whenever a requirements file changes.
#   make smoke      # the main job, offline smoke variant: train.py --config configs/smoke.yaml
#   make test-all   # the whole test suite (what CI runs); builds llama.cpp's runtime once per machine
#   make test       # the developer's loop: everything but the tests marked slow
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# llama.cpp's runtime for export tests and q4_k_m: built from its PyPI source once per machine (~4-9 min on 2 cores)
# and kept as a wheel in the cache, where export.py also keeps llama.cpp's converter. Built for x86-64-v3 (AVX2, FMA,
# F16C), not for the building CPU: a native build uses every extension the CPU reports, and a virtual machine's CPU
# that reports AMX without the OS giving it to processes stopped the tests at ggml's first AMX instruction (SIGILL).
LLAMA_CPP := llama-cpp-python==0.3.36
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
CACHE := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/phi2-qlora
LLAMA_WHEELS := $(CACHE)/wheels-x86-64-v3

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@

smoke: $(VENV)/.installed
	$(PY) train.py --config configs/smoke.yaml

test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

# (a runtime installed before, native, is replaced once per environment)
$(VENV)/.llama-runtime: $(VENV)/.installed
	@ls $(LLAMA_WHEELS)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || \
		CMAKE_ARGS="$(LLAMA_CMAKE)" $(PY) -m pip wheel -q --no-deps --no-cache-dir $(LLAMA_CPP) \
			-w $(LLAMA_WHEELS)
	$(PY) -m pip uninstall -q -y llama-cpp-python
	$(PY) -m pip install -q --find-links $(LLAMA_WHEELS) $(LLAMA_CPP)
	touch $@

llama-runtime: $(VENV)/.llama-runtime

test-all: llama-runtime
	$(PY) -m pytest -q

.PHONY: smoke test test-all llama-runtime
