# The README's commands. Every target creates/uses $(VENV) and installs what it needs first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.opgrpo-installed
export HF_HUB_OFFLINE := 1
export DS_ACCELERATOR ?= cpu

.PHONY: install system-deps demo test lint bench bench-sample-efficiency bench-async bench-hard-regime gpu-check \
	pretrain clean

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

# The main job: the tiny shapes training on the shipped base model, on an embedded Ray and an
# embedded Redis. Each run gets its own directory under runs/ (DEMO_RUN=name to choose it).
DEMO_STEPS ?= 120
ifndef DEMO_RUN
DEMO_RUN := demo-$(shell date +%Y%m%d-%H%M%S)
endif

demo: install
	$(VENV)/bin/opgrpo train --config configs/shapes_tiny.yaml --set run.name=$(DEMO_RUN) \
	  --set train.num_steps=$(DEMO_STEPS) --set train.eval_every=60
	$(VENV)/bin/opgrpo report runs/$(DEMO_RUN)

# Benchmarks write JSON + PNG into bench/results/ (see docs/benchmarks.md). `bench` runs the
# system-cost ones (minutes); `bench-sample-efficiency` trains 11 runs of 300 steps (hours,
# resumable: run it again after a stop and it continues where it was).
bench: install
	$(PY) bench/system.py
	$(PY) bench/weight_push.py
	$(PY) bench/buffer.py
	$(PY) bench/rollout_scaling.py

bench-sample-efficiency: install
	$(PY) bench/sample_efficiency.py run

# sync vs async (docs/benchmarks.md section 7; hours, resumable): the 5 timing runs alone first
# (50 steps each), then the 9 accuracy runs (each trained, then its checkpoints evaluated)
bench-async: install
	$(PY) bench/async_pipeline.py timing
	$(PY) bench/async_pipeline.py run
	$(PY) bench/async_pipeline.py report

# OP-GRPO where whole groups fail (docs/benchmarks.md section 8; ~1 h per run, 16 runs,
# resumable): the hard prompt sets, then GRPO / OP-GRPO / rescue / none / naive (+ need)
bench-hard-regime: install
	test -f configs/shapes/hard_train_metadata.jsonl || $(PY) bench/hard_prompts.py
	$(PY) bench/hard_regime.py run
	$(PY) bench/hard_regime.py timing
	$(PY) bench/hard_regime.py report --docs

# One GPU (80-140 GB), at most 10 minutes: rollout images/s, learner s/update, peak memory per
# role, the bf16 on-policy ratio, LoRA push time and a 2-step service run on a random pipeline of
# SD3.5-Medium's sizes (nothing downloaded) -> bench/results/gpu_check.json
gpu-check: install
	$(PY) bench/gpu_check.py

# Regenerate the shipped shapes base model from scratch (same seed, same model).
pretrain: install
	$(VENV)/bin/opgrpo pretrain --out tasks/shapes/shapes-base --seed 0 --overwrite

lint: install
	$(VENV)/bin/ruff check .

# Debian packages the tests use, as command:package: docker-compose validates
# docker-compose.yml (there is no Docker engine to run it; tests/test_compose_topology.py runs
# the same topology as processes); tesseract is the OCR reward's CPU engine.
DEBS := docker-compose:docker-compose tesseract:tesseract-ocr
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
system-deps:
	@missing=""; for d in $(DEBS); do command -v $${d%%:*} >/dev/null 2>&1 || missing="$$missing $${d#*:}"; done; \
	if [ -n "$$missing" ]; then echo "apt-get install$$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $(SUDO) apt-get install -y -q $$missing >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q $$missing >/dev/null; }; fi

test: install system-deps
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -p no:cacheprovider --durations=30

clean:
	rm -rf out .pytest_cache .ruff_cache
