# Two commands on a fresh machine (Python 3.11, Linux; no GPU, no network beyond the package index). Each installs
# what it needs on first use, into .venv/, and again whenever a requirements file changes.
#   make smoke    # the main job, offline smoke variant: train.py --config configs/smoke.yaml
#   make test     # the test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@

smoke: $(VENV)/.installed
	$(PY) train.py --config configs/smoke.yaml

test: $(VENV)/.installed
	$(PY) -m pytest -q

.PHONY: smoke test
