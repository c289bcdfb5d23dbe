# Two commands do all the set-up on a fresh machine (Python >= 3.10 with venv; PYTHON=python3.11 picks one):
#   make demo   # create .venv and install (torch's CPU build first) if needed, then run the shipped demo
#   make test   # the same set-up, then lint (ruff, the architecture rules) and the test suite (what .ci/run runs)
#
# torch: the CPU build unless told otherwise. On public PyPI a plain `pip install torch` is the
# multi-GB CUDA build on Linux x86_64; the CPU build comes from PyTorch's own index. A pip that is
# configured with a local torch wheel (find-links, as on this project's machines) uses that, offline.
# For a CUDA build name its index (cu126, cu128, ...; see pytorch.org), or leave TORCH_INDEX empty
# for pip's default index:
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cu128
# VERBOSE=1 shows pip's own output.

VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
TORCH_INDEX ?= $(TORCH_CPU_INDEX)
PY := $(VENV)/bin/python
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# pip's progress and warnings (this project's machines add one "Location ... is ignored" line per
# package from their pip configuration) hidden; its errors still print
PIPQ := $(if $(VERBOSE),,-qq)
RELEX := $(OFFLINE) $(VENV)/bin/relex-merge

.PHONY: demo test lint install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@echo "setting up $(VENV): $(TORCH) from $(or $(TORCH_INDEX),pip's default index), then relex-merge and its dependencies (a few minutes; VERBOSE=1 shows pip's output)"
	@$(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install $(PIPQ) --upgrade pip
	@# the CPU build: a local wheel pip already knows of (no network), else PyTorch's CPU index
	@if [ "$(TORCH_INDEX)" = "$(TORCH_CPU_INDEX)" ] && $(PY) -m pip install $(PIPQ) --no-index --no-deps "$(TORCH)" 2>/dev/null; then :; \
	else $(PY) -m pip install $(PIPQ) --no-deps $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"; fi
	@$(PY) -m pip install $(PIPQ) -e ".[test,plots]"
	@$(PY) -c "import torch; print(f'installed torch {torch.__version__} (CUDA: {torch.version.cuda or \"none, the CPU build\"}) and relex-merge into $(VENV)')"
	@touch $@

demo: install
	@echo "\$$ relex-merge merge_configs/demo.yml out/demo --overwrite"
	@$(RELEX) merge_configs/demo.yml out/demo --overwrite
	@echo "\$$ relex-merge analyze merge_configs/demo.yml --out out/demo-analysis --overwrite"
	@$(RELEX) analyze merge_configs/demo.yml --out out/demo-analysis --overwrite
	@echo "\$$ relex-merge eval out/demo --tasks relex_demo_addition --include-path demo/tasks"
	@$(RELEX) eval out/demo --tasks relex_demo_addition --include-path demo/tasks

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) scripts/architecture.py --check

test: lint
	$(OFFLINE) $(PY) -m pytest -q

clean:
	rm -rf out/demo out/demo-analysis
