# Two commands do all the set-up on a fresh machine (Python >= 3.10 with venv):
#   make demo   # create .venv and install (torch's CPU build first) if needed, then run the shipped demo
#   make test   # the same set-up, then lint (ruff, the architecture rules) and the test suite (what .ci/run runs)
# On a GPU machine pick your torch build: make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

.PHONY: demo test lint install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[test,plots]"
	touch $@

demo: install
	$(OFFLINE) $(VENV)/bin/relex-merge merge_configs/demo.yml out/demo --overwrite
	$(OFFLINE) $(VENV)/bin/relex-merge analyze merge_configs/demo.yml --out out/demo-analysis --overwrite
	$(OFFLINE) $(VENV)/bin/relex-merge eval out/demo --tasks relex_demo_addition --include-path demo/tasks

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) scripts/architecture.py --check

test: lint
	$(OFFLINE) $(PY) -m pytest -q

clean:
	rm -rf out/demo out/demo-analysis
