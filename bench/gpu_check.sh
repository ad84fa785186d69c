#!/usr/bin/env bash
# The one prepared GPU measurement (one H100 / H200, about 11 minutes, no network, nothing outside
# the checkout): the kernel tests run compiled on the card, the routed-loss benchmark, two steps of
# both paper pairs at their real shapes with eager and compiled rollouts (shortened: 2 micro-batches
# of 4 prompts x 4 rollouts, 256 new tokens), the rollout engines side by side (bench/rollout_bench.py;
# vLLM when installed), and `dopd demo` on the GPU. Everything lands in
# OUT_DIR and is gathered into OUT_DIR/gpu_result.json; then
#   python bench/gpu_tables.py OUT_DIR/gpu_result.json     rewrites the README's GPU tables.
# Needs torch, triton, pytest and the package's dependencies (trl for the TRL rows).
#   bash bench/gpu_check.sh [OUT_DIR]      (default bench/results)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/results}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
date -u +%Y-%m-%d > "$out/date.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
timeout 90 python -m pytest -q -p no:cacheprovider tests/loss/test_kernels.py -k "reference or either_backend" 2>&1 | tee "$out/kernel_tests.log"
timeout 150 python bench/loss_bench.py --device cuda 2>&1 | tee "$out/loss_gpu.jsonl"
short="optim.gradient_accumulation_steps=2 rollout.max_new_tokens=256"
for recipe in configs/qwen3_8b_to_1.7b.yaml configs/qwen3vl_8b_to_2b.yaml; do
  for generation in eager compiled; do
    name="recipe_$(basename "$recipe" .yaml)_$generation"
    timeout 60 python bench/gpu_recipe.py "$recipe" $short "rollout.generation=$generation" --steps 2 2>&1 | tee "$out/$name.log" | grep '^{' > "$out/$name.jsonl"
  done
done
# Rollout engines side by side at the 1.7B student's shape (the README's 'Fast rollouts with vLLM');
# the image has no vLLM unless `pip install vllm` ran first; without it only the hf engines are timed.
engines=eager,compiled
python -c "import vllm" 2>/dev/null && engines=eager,compiled,vllm || echo "vllm not installed: rollout bench without it"
timeout 150 python bench/rollout_bench.py --shape Qwen/Qwen3-1.7B --device cuda --dtype bfloat16 --engines "$engines" \
  --prompt-lengths 256 --new-tokens 512 --batch-sizes 64 2>&1 | tee "$out/rollout_gpu.md"
start=$(date +%s)
timeout 60 python -m dopd_vl.cli demo --out "$out/demo_out" 2>&1 | tail -n 20 | tee "$out/demo.log"
echo $(( $(date +%s) - start )) > "$out/demo_seconds.txt"
python bench/gpu_tables.py --collect "$out"
