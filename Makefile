# The two commands of the README: `make demo` (main job) and `make test` (test suite).
# Both create or reuse .venv (scripts/setup_env.sh) and install everything they need.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow test-gpu gpu-check gpu-check-prepare gpu-check-dry-run clean

setup:
	@bash scripts/setup_env.sh

demo: setup
	$(OFFLINE) $(VENV)/bin/memlm demo $(DEMO_ARGS)

# CI suite: everything except slow and GPU tests. pytest's exit code 5 (no tests ran) is a failure.
test: setup
	@$(OFFLINE) $(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

test-slow: setup
	$(OFFLINE) $(PY) -m pytest -m slow $(PYTEST_ARGS)

test-gpu: setup
	$(OFFLINE) $(PY) -m pytest -m gpu $(PYTEST_ARGS)

# GPU readiness (scripts/gpu_check.py). On the GPU machine, with its own python3 and packages:
#   make gpu-check GPU_CHECK_ARGS="--out $$OUT"
# Inputs that need MiniLM / FAISS are built here first (CPU): make gpu-check-prepare.
gpu-check:
	$(OFFLINE) python3 scripts/gpu_check.py $(GPU_CHECK_ARGS)

gpu-check-prepare: setup
	$(OFFLINE) $(PY) scripts/gpu_check.py --prepare runs/gpu-check-prepared

gpu-check-dry-run: setup
	$(OFFLINE) $(PY) scripts/gpu_check.py --dry-run

clean:
	rm -rf $(VENV) .pytest_cache
