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
import gpu_tables  # noqa: E402,F401

pytestmark = pytest.mark.integration  # see pyproject.toml's markers


@pytest.mark.parametrize(
    "name,total,non_embedding",
    [
        ("Qwen/Qwen3-1.7B", 1.7e9, 1.4e9),
        ("Qwen/Qwen3-8B", 8.2e9, 6.95e9),
        ("Qwen/Qwen3-VL-2B-Instruct", 2.1e9, None),
        ("Qwen/Qwen3-VL-8B-Instruct", 8.8e9, None),
    ],
)
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
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "gpu_recipe.py"),
            str(REPO / "configs" / "qwen3vl_8b_to_2b.yaml"),
            "--tiny",
            "--steps",
            "1",
            "optim.batch_size=2",
            "optim.gradient_accumulation_steps=1",
            "rollout.max_new_tokens=4",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    step, summary = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
    assert (
        step["responses"] == 8
        and step["step_s"] > 0
        and all(step[k] >= 0 for k in ("rollout_s", "scoring_s", "loss_backward_s", "update_s"))
    )
    assert (
        summary["student"] == "Qwen/Qwen3-VL-2B-Instruct"
        and summary["num_generations"] == 4
        and summary["tiny"] is True
    )


def test_loss_bench_gpu_mode_runs_end_to_end_on_cpu():
    """`bench/loss_bench.py --device cuda` is the GPU measurement; its code path (every method,
    the summary line) runs here on the CPU with a small vocabulary, kernels under the interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "loss_bench.py"),
            "--device",
            "cpu:0",
            "--sizes",
            "16x24",
            "--vocab",
            "3000",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    *rows, summary = (json.loads(line) for line in done.stdout.strip().splitlines())
    assert [r["method"] for r in rows] == ["naive", "dopd", "dopd_torch", "vanilla", "trl"]
    assert all(r["seconds"] > 0 for r in rows if r["method"] != "trl")
    assert rows[1]["backend"] == "triton" and rows[2]["backend"] == "torch"
    assert {"gpu_time_dopd_over_trl", "gpu_time_vanilla_over_trl", "gpu_memory_dopd_over_trl"} <= set(summary)


def test_gpu_tables_are_written_from_a_result_file_and_the_readme_holds_the_recorded_one(tmp_path):
    """bench/gpu_tables.py: the README's GPU block is exactly the recorded H200 result's rendering;
    a result gathered from gpu_check.sh's parts (written here as the scripts print them) fills
    every table; whatever a result lacks reads "not measured"."""

    recorded = json.loads((REPO / "bench" / "recorded" / "gpu_result_h200_2026-11-28.json").read_text())
    text = gpu_tables.render(recorded)
    assert (
        "**NVIDIA H200**, 2026-11-28" in text
        and "| chunked DOPD, torch backend | 0.114 s, 8.62 GB (chunk 2048) |" in text
    )
    assert "| chunked DOPD, Triton kernels | not measured | not measured | not measured |" in text
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert gpu_tables.rewrite(readme, recorded) == readme

    out = tmp_path / "results"
    (out / "demo_out").mkdir(parents=True)
    (out / "gpu.txt").write_text("NVIDIA H100 80GB HBM3, 81559 MiB\n")
    (out / "date.txt").write_text("2026-12-01\n")
    (out / "kernel_tests.log").write_text("........ [100%]\n41 passed, 3 deselected in 50.1s\n")
    loss = list(recorded["loss"])
    loss.append(
        {
            "method": "dopd",
            "H": 4096,
            "T": 16384,
            "backend": "triton",
            "chunk": 2048,
            "seconds": 0.51,
            "peak_extra_gb": 4.2,
        }
    )
    summary = {
        "at": {"H": 4096, "T": 16384, "V": 151936},
        "device": "NVIDIA H100",
        "gpu_time_dopd_over_trl": 1.13,
        "gpu_time_vanilla_over_trl": 0.98,
        "gpu_memory_dopd_over_trl": 1.13,
        "gpu_memory_vanilla_over_trl": 0.9,
        "gpu_time_dopd_torch_over_trl": 2.2,
    }
    (out / "loss_gpu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*loss, summary]))
    step = {
        "step": 2,
        "step_s": 21.5,
        "rollout_s": 14.2,
        "scoring_s": 1.1,
        "loss_backward_s": 5.3,
        "update_s": 0.9,
        "peak_memory_gb": 61.2,
        "responses": 32,
        "mean_response_tokens": 256.0,
        "loss": 0.01,
    }
    recipe_summary = {"recipe": "configs/qwen3_8b_to_1.7b.yaml", "peak_memory_gb": 61.2, "step_s_last": 21.5}
    (out / "recipe_qwen3_8b_to_1.7b_eager.jsonl").write_text(
        json.dumps(step) + "\n" + json.dumps(recipe_summary) + "\n"
    )
    (out / "demo_out" / "summary.json").write_text(
        json.dumps(
            {"accuracy_before": {"student": {"accuracy": 0.42}}, "accuracy_after": {"student": {"accuracy": 0.53}}}
        )
    )
    (out / "demo_seconds.txt").write_text("41\n")
    result = gpu_tables.collect(out)
    text = gpu_tables.render(result)
    assert "**NVIDIA H100 80GB HBM3, 81559 MiB**, 2026-12-01" in text
    assert "| qwen3_8b_to_1.7b.yaml | eager | 61.2 GB | 21.5 s | 14.2 s | 1.1 s | 5.3 s | 0.9 s |" in text
    assert (
        "gpu_time_dopd_over_trl 1.13" in text
        and "41 passed, 0 failed" in text
        and "41 s, held-out accuracy 0.42 → 0.53" in text
    )
    assert "0.51 s, 4.2 GB (chunk 2048)" in text
    rewritten = gpu_tables.rewrite(readme, result)
    assert (
        rewritten != readme
        and gpu_tables.rewrite(rewritten, result) == rewritten
        and rewritten.count(gpu_tables.START) == 1
    )
    with pytest.raises(ValueError, match="gpu-tables"):
        gpu_tables.rewrite("# no block here", result)


def test_check_data_bench_checks_both_sources_without_faults():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "check_data_bench.py"), "--records", "300"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [line["source"] for line in lines] == ["jsonl", "parquet"]
    assert all(
        line["records"] == line["valid"] == 300 and line["faults"] == 0 and line["records_per_s"] > 0 for line in lines
    )
