# Two entry points: `make run` (set up, then run the pipeline) and `make test` (set up, then run the tests).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python

# Nothing here may phone home (see DESIGN.md, "Stack: measured facts").
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup run test ui bench

$(VENV)/.installed: requirements.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt
	touch $@

setup: $(VENV)/.installed

run: setup
	$(PY) -m pipeline repro

test: setup
	$(PY) -m pytest -q

ui: setup
	$(PY) -m pipeline ui

bench: setup
	$(PY) bench/stages.py
	$(PY) bench/linker.py
	$(PY) bench/train.py
	$(PY) bench/overhead.py
