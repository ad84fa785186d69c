#!/usr/bin/env bash
# The GPU measurement of the routed loss, prepared for a machine with an NVIDIA GPU, torch and
# triton: the kernel tests compiled for the GPU (TRITON_INTERPRET=0), then the benchmark
# (bench/loss_bench.py --device cuda: naive, chunked DOPD with kernels and with torch, chunked
# vanilla_opd full RKL, TRL's chunked JSD; last line: the ratios at H 4096, T 16384).
# Needs pytest, and trl for the TRL rows (`pip install -e '.[dev,bench,gpu]'`).
#   bash bench/gpu_check.sh [OUT_DIR]      (default bench/results)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/results}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python -m pytest -q -p no:cacheprovider tests/test_kernels.py -k reference 2>&1 | tee "$out/kernel_tests.log"
python bench/loss_bench.py --device cuda 2>&1 | tee "$out/loss_gpu.jsonl"
