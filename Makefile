# The README's commands. Every target creates/uses $(VENV) and installs what it needs first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.opgrpo-installed
export HF_HUB_OFFLINE := 1
export DS_ACCELERATOR ?= cpu

.PHONY: install demo test lint bench pretrain clean

install: $(STAMP)

# torch first: keep any torch the venv already has (e.g. a CUDA build); otherwise a CUDA build
# where a GPU driver is present, else the CPU build torch==2.13.0.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || { \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	  else $(PY) -m pip install -q torch==2.13.0; fi; }
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: install
	$(VENV)/bin/opgrpo eval --model models/shapes-base \
	  --prompts configs/shapes/test_metadata.jsonl --reward shapes
	$(VENV)/bin/opgrpo sample --model models/shapes-base \
	  --prompts configs/shapes/test_metadata.jsonl --out out/shapes_base.png \
	  --reward shapes --n-per-prompt 4 --max-prompts 12

# Regenerate the shipped shapes base model from scratch (same seed, same model).
pretrain: install
	$(VENV)/bin/opgrpo pretrain --out models/shapes-base --seed 0 --overwrite

lint: install
	$(VENV)/bin/ruff check .

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -p no:cacheprovider

clean:
	rm -rf out .pytest_cache .ruff_cache
