# Two entry points: `make run` (set up, then run the pipeline) and `make test` (set up, then run the tests).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python

# Nothing here may phone home (docs/design.md, "Stack: measured facts").
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup run run-all-baselines test ui serve bench

$(VENV)/.installed: requirements.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt
	$(PY) -m pipeline.plots
	touch $@

setup: $(VENV)/.installed

run: setup
	$(PY) -m pipeline repro

# The paper's whole comparison: the default run plus ReDial, KECRS and RevCore (recommenders and generators) and
# KBRD's generator, as a DVC experiment (README, "Stages: pre-training, fine-tuning, baselines, evaluation").
ALL_BASELINES := -S 'baselines.train=[textcnn,kbrd,kgsf,redial,kecrs,revcore]' \
                 -S 'conv_baselines.train=[transformer,kbrd,kgsf,redial,kecrs,revcore,wo_iw]'
run-all-baselines: setup
	dvc exp run $(ALL_BASELINES)

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

ui: setup
	$(PY) -m pipeline ui

# The chat page and HTTP API on http://127.0.0.1:8000/ (README, "Talk to it in a browser").
serve: setup
	$(PY) -m pipeline serve

bench: setup
	$(PY) bench/stages.py
	$(PY) bench/linker.py
	$(PY) bench/train.py
	$(PY) bench/overhead.py
