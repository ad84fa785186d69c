"""Rollout throughput: the same prompts sampled by Hugging Face `generate` (eager and compiled) and
by vLLM, side by side in one run, at a few prompt / response lengths and batch sizes.

    .venv-vllm/bin/python bench/rollout_bench.py                      # CPU: a tiny Qwen3 (head_dim 64)
    python bench/rollout_bench.py --shape Qwen/Qwen3-1.7B --device cuda --batch-sizes 64 \\
        --new-tokens 512,2048 --prompt-lengths 256                       # a GPU, the real shape (random weights)

Sampling as in training (temperature 1, top_p 1, the full distribution); the end tokens are never
sampled, so every response runs to its length and tokens/s counts the same tokens on each engine.
Each engine answers once untimed first (compiled generation compiles then; vLLM warms up), then
the timed call. Prints one JSON line per (engine, shape) and a table with vLLM's ratio to each.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def build_model_folder(args, folder: Path) -> Path:
    """A model folder with weights: a `tiny:` spec, or random weights of a recipe model's shape."""
    from dopd_vl import resolve_model_path

    if args.shape is None:
        return Path(resolve_model_path(args.model))
    from bench.gpu_recipe import build_on_device, model_folder

    path = model_folder(args.shape, folder, tiny=False)
    model = build_on_device(path, args.dtype, device=torch.device(args.device))
    model.save_pretrained(path, safe_serialization=True)
    del model
    return path


def records_of_length(tokenizer, prompt_tokens: int, count: int) -> list[dict]:
    """`count` distinct user prompts of about `prompt_tokens` tokens (before the chat template)."""
    words = tokenizer.decode(list(range(1000, 1000 + prompt_tokens)))
    return [{"id": str(i), "prompt": [{"role": "user", "content": f"{i}: {words}"}]} for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny:qwen3:hidden_size=128,num_heads=2,num_kv_heads=1")
    parser.add_argument("--shape", help="a recipe model (bench/gpu_recipe.py RECIPE_SHAPES), random weights")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompt-lengths", default="32,128")
    parser.add_argument("--new-tokens", default="32,128")
    parser.add_argument("--batch-sizes", default="8,32")
    parser.add_argument("--engines", default="eager,compiled,vllm")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    args = parser.parse_args()

    from dopd_vl import (
        RolloutConfig,
        VllmConfig,
        eos_token_ids,
        load_model,
        load_processing,
        make_adapter,
        never_sampled_token_ids,
        sample_responses,
    )
    from dopd_vl.models.loading import vocab_size  # internal: the engine's allowed ids need the head's width

    lengths = [int(x) for x in args.prompt_lengths.split(",")]
    new_tokens = [int(x) for x in args.new_tokens.split(",")]
    batches = [int(x) for x in args.batch_sizes.split(",")]
    engines = args.engines.split(",")
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_model_folder(args, Path(tmp))
        processing = load_processing(path)
        adapter = make_adapter(processing)
        model = load_model(path, args.dtype, device=device).eval() if {"eager", "compiled"} & set(engines) else None
        ends = eos_token_ids(processing, model) if model is not None else [processing.eos_token_id]
        never = sorted(set(never_sampled_token_ids(processing, model) if model is not None else []) | set(ends))
        shapes = [(p, n, b) for p in lengths for n in new_tokens for b in batches]
        speeds: dict[tuple, dict[str, float]] = {shape: {} for shape in shapes}
        # vLLM's CPU build pins this process to one thread once its engine starts: it comes last.
        for engine in sorted(engines, key=lambda e: e == "vllm"):
            if engine == "vllm":
                from dopd_vl import VllmEngine

                vllm_engine = VllmEngine(
                    str(path), RolloutConfig(engine="vllm", vllm=VllmConfig(args.gpu_memory_utilization)),
                    dtype=args.dtype, device=device, max_model_len=max(lengths) + max(new_tokens) + 64,
                    vocab_size=vocab_size(processing), eos_token_ids=ends, suppress_token_ids=never,
                )  # fmt: skip
            for prompt_tokens, tokens, batch in shapes:
                records = records_of_length(processing, prompt_tokens, batch)
                hf = engine != "vllm"
                rollout = RolloutConfig(
                    num_generations=1, max_new_tokens=tokens, generation=engine if hf else "eager",
                    engine="hf" if hf else "vllm",
                )  # fmt: skip

                def sample():
                    if hf:
                        return sample_responses(model, adapter, records, rollout, ends, never)
                    return vllm_engine.sample(None, adapter, records, rollout)

                sample()  # untimed: compiles / warms up
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                out = sample()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - started
                generated = sum(r.numel() for r in out.responses)
                speeds[(prompt_tokens, tokens, batch)][engine] = generated / seconds
                row = dict(engine=engine, prompt_tokens=prompt_tokens, new_tokens=tokens, batch=batch)
                row.update(generated=generated, seconds=round(seconds, 3), tokens_per_s=round(generated / seconds, 1))
                print(json.dumps(row), flush=True)
    print(f"\nrollout tokens/s on {args.device} ({args.shape or args.model}, {args.dtype}); vLLM's ratio to each")
    others = [e for e in engines if e != "vllm"] if "vllm" in engines else []
    print("| prompt | new | batch | " + " | ".join(engines) + "".join(f" | vllm/{e}" for e in others) + " |")
    print("|---" * (3 + len(engines) + len(others)) + "|")
    for (prompt_tokens, tokens, batch), t in speeds.items():
        cells = [f"{t[e]:.0f}" for e in engines] + [f"{t['vllm'] / t[e]:.2f}x" for e in others]
        print(f"| {prompt_tokens} | {tokens} | {batch} | " + " | ".join(cells) + " |")


if __name__ == "__main__":  # vLLM's engine may start worker processes
    main()
