"""bench/gpu_recipe.py: the recipes' model shapes match the published sizes, and the script runs
end to end with tiny shapes on any machine (on a GPU it runs the real shapes)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import gpu_recipe  # noqa: E402


@pytest.mark.parametrize("name,total,non_embedding", [("Qwen/Qwen3-1.7B", 1.7e9, 1.4e9), ("Qwen/Qwen3-8B", 8.2e9, 6.95e9),
                                                      ("Qwen/Qwen3-VL-2B-Instruct", 2.1e9, None), ("Qwen/Qwen3-VL-8B-Instruct", 8.8e9, None)])
def test_recipe_shapes_have_the_published_parameter_counts(tmp_path, name, total, non_embedding):
    # Model cards: Qwen3-1.7B 1.7B (1.4B non-embedding), Qwen3-8B 8.2B (6.95B); the VL models ~2B / ~8.8B.
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(str(gpu_recipe.model_folder(name, tmp_path / "m", tiny=False)))
    auto = AutoModelForImageTextToText if getattr(config, "vision_config", None) is not None else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - total) / total < 0.03, count
    if non_embedding:
        embedding = model.get_input_embeddings().weight.numel() * (1 if config.tie_word_embeddings else 2)
        assert abs(count - embedding - non_embedding) / non_embedding < 0.03


def test_gpu_recipe_runs_with_tiny_shapes():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_recipe.py"), str(REPO / "configs" / "qwen3vl_8b_to_2b.yaml"), "--tiny", "--steps", "1",
                           "optim.batch_size=2", "optim.gradient_accumulation_steps=1", "rollout.max_new_tokens=4"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    step, summary = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
    assert step["responses"] == 8 and step["step_s"] > 0 and all(step[k] >= 0 for k in ("rollout_s", "scoring_s", "loss_backward_s", "update_s"))
    assert summary["student"] == "Qwen/Qwen3-VL-2B-Instruct" and summary["num_generations"] == 4 and summary["tiny"] is True


def test_loss_bench_gpu_mode_runs_end_to_end_on_cpu():
    """`bench/loss_bench.py --device cuda` is the GPU measurement; its code path (every method,
    the summary line) runs here on the CPU with a small vocabulary, kernels under the interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(REPO / "bench" / "loss_bench.py"), "--device", "cpu:0", "--sizes", "16x24", "--vocab", "3000"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    *rows, summary = (json.loads(line) for line in done.stdout.strip().splitlines())
    assert [r["method"] for r in rows] == ["naive", "dopd", "dopd_torch", "vanilla", "trl"]
    assert all(r["seconds"] > 0 for r in rows if r["method"] != "trl")
    assert rows[1]["backend"] == "triton" and rows[2]["backend"] == "torch"
    assert {"gpu_time_dopd_over_trl", "gpu_time_vanilla_over_trl", "gpu_memory_dopd_over_trl"} <= set(summary)
