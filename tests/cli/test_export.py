"""`dopd export` and harness evaluation (docs/design.md §4.7): a run's student leaves the run folder
as a Hugging Face folder that plain transformers, peft and lm-evaluation-harness load, and answers
there exactly as the run's own evaluation does."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dopd_vl.cli import main
from dopd_vl.errors import DopdError
from dopd_vl.files import created_mode
from dopd_vl.training.config import load_config
from dopd_vl.training.trainer import Trainer

from conftest import REPO

pytestmark = pytest.mark.integration  # see pyproject.toml's markers

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
RECIPES = {
    "text": ("tiny_text.yaml", REPO / "configs" / "data" / "arith" / "data.jsonl"),
    "vision": ("tiny_vlm.yaml", REPO / "configs" / "data" / "shapes" / "data.jsonl"),
}


def train_run(out: Path, recipe: str, data: Path, *overrides: str) -> Path:
    config = load_config(
        REPO / "configs" / recipe,
        [f"data.train={data}", f"output_dir={out}", "max_steps=2", "save_steps=2", *overrides],
    )
    Trainer(config).train()
    return out


def local_paths(folder: Path) -> list[str]:
    """Files of `folder` that mention a local absolute path of this machine."""
    needles = {str(REPO), str(folder.parent), str(Path.home() / ".cache"), os.environ.get("DOPD_TINY_CACHE", "")}
    found = []
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix != ".safetensors":
            text = path.read_text(encoding="utf-8", errors="replace")
            found += [f"{path.name}: {n}" for n in needles if n and n in text]
    return found


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.mark.parametrize("kind", ["text", "vision"])
def test_exported_student_answers_in_plain_transformers_as_in_the_run(tmp_path, kind):
    recipe, data = RECIPES[kind]
    run = train_run(tmp_path / "run", recipe, data)
    export = tmp_path / "published"
    assert main(["export", str(run), "--out", str(export)]) == 0
    assert (
        main(
            [
                "eval",
                "--model",
                str(run / "final"),
                "--data",
                str(data),
                "--limit",
                "4",
                "--max-new-tokens",
                "8",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "ours.json"),
            ]
        )
        == 0
    )
    ours = [r["response"] for r in json.loads((tmp_path / "ours.json").read_text())["responses"]]
    plain = subprocess.run(
        [sys.executable, str(REPO / "tests" / "helpers" / "plain_generate.py"), str(export), str(data), "4", "8"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert json.loads(plain.stdout.splitlines()[-1]) == ours

    card = (export / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and meta["base_model"] == (
        "tiny:qwen3" if kind == "text" else "tiny:qwen3-vl"
    )
    assert meta["pipeline_tag"] == ("text-generation" if kind == "text" else "image-text-to-text")
    assert {"dopd", "distillation"} <= set(meta["tags"]) and "license" not in meta
    assert (
        "| objective | dopd |" in card
        and "| steps | 2 |" in card
        and "Mean regime occupancy" in card
        and "dopd train dopd_recipe.yaml" in card
    )
    assert local_paths(export) == []
    recipe_saved = yaml.safe_load((export / "dopd_recipe.yaml").read_text())
    assert recipe_saved["data"]["train"] == data.name and recipe_saved["objective"]["name"] == "dopd"
    generation = json.loads((export / "generation_config.json").read_text())
    assert (
        set(generation["eos_token_id"]) >= {151645, 151643} and generation["suppress_tokens"]
    )  # <|im_end|>, <|endoftext|>; padding rows
    assert (
        export / "README.md"
    ).stat().st_mode & 0o777 == created_mode() and export.stat().st_mode & 0o777 == created_mode(directory=True)


def test_adapter_export_loads_with_peft_and_answers_as_the_merged_export(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from dopd_vl.models.loading import resolve_model_path

    recipe, data = RECIPES["text"]
    run = train_run(tmp_path / "run", recipe, data, "lora.enabled=true", "lora.r=4", "optim.lr=1e-2")
    assert main(["export", str(run), "--out", str(tmp_path / "merged")]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "adapter"), "--adapter"]) == 0
    assert (
        main(["export", str(run), "--out", str(tmp_path / "checkpoint"), "--checkpoint", "2"]) == 0
    )  # LoRA checkpoint, merged onto the base
    assert "| exported from | checkpoint-2 (LoRA merged) |" in (tmp_path / "checkpoint" / "README.md").read_text()
    assert (tmp_path / "adapter" / "adapter_config.json").is_file() and not (
        tmp_path / "adapter" / "model.safetensors"
    ).exists()
    assert (
        json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
        == "tiny:qwen3"
    )
    adapter_card = (tmp_path / "adapter" / "README.md").read_text()
    assert front_matter(adapter_card)["library_name"] == "peft" and local_paths(tmp_path / "adapter") == []
    assert (
        "GenerationConfig.from_pretrained('THIS_FOLDER')" in adapter_card
    )  # what the test below does to match the merged export

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    prompts = [json.loads(line)["prompt"] for line in data.read_text().splitlines()[:3]]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    from_checkpoint = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint")
    assert all(torch.equal(p, q) for p, q in zip(merged.state_dict().values(), from_checkpoint.state_dict().values()))
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny:qwen3")), tmp_path / "adapter"
    ).eval()
    generation = GenerationConfig.from_pretrained(tmp_path / "adapter")
    for messages in prompts:
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, enable_thinking=False, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            a = merged.generate(**ids, do_sample=False, max_new_tokens=8)
            b = adapted.generate(**ids, generation_config=generation, do_sample=False, max_new_tokens=8)
        assert a.tolist() == b.tolist()
    # The adapter changed the student: the export is not the base model.
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny:qwen3"))
    assert any(not torch.equal(p, q) for p, q in zip(base.state_dict().values(), merged.state_dict().values()))


def test_lm_eval_harness_on_the_exported_toy_student_matches_dopd_eval(tmp_path):
    pytest.importorskip("lm_eval", reason="the [eval] extra (lm-evaluation-harness) is part of make test's install")
    sys.path.insert(0, str(REPO))
    from examples.toy_privilege import harness as toy

    train, heldout = toy.write_data(tmp_path, "add_hidden", toy.TASKS["add_hidden"].sizes["smoke"], 0)
    student = toy.train_model(tmp_path / "student", "student", "add_hidden", train, 0, 60, device="cpu")
    run = train_run(
        tmp_path / "run",
        "tiny_text.yaml",
        train,
        f"student.name_or_path={student}",
        f"teacher.name_or_path={student}",
        "objective.top_k=16",
        "rollout.max_new_tokens=4",
    )
    export = tmp_path / "published"
    assert main(["export", str(run), "--out", str(export), "--eval-data", str(heldout), "--max-new-tokens", "4"]) == 0
    assert (
        main(
            [
                "eval",
                "--model",
                str(export),
                "--data",
                str(heldout),
                "--max-new-tokens",
                "4",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "ours.json"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "eval",
                "--harness",
                "lm-eval",
                "--model",
                str(export),
                "--data",
                str(heldout),
                "--max-new-tokens",
                "4",
                "--device",
                "cpu",
                "--batch-size",
                "1",
                "--out",
                str(tmp_path / "harness"),
            ]
        )
        == 0
    )
    ours = json.loads((tmp_path / "ours.json").read_text())
    harness = json.loads((tmp_path / "harness" / "lm_eval_results.json").read_text())
    assert harness["results"]["dopd_records"]["acc,none"] == ours["accuracy"] and ours["accuracy"] > 0
    assert [s["filtered_resps"][0].strip() for s in harness["samples"]["dopd_records"]] == [
        r["response"] for r in ours["responses"]
    ]
    assert "| dopd_records | acc |" in (tmp_path / "harness" / "summary.md").read_text()
    evaluation = json.loads((export / "eval_results.json").read_text())
    assert evaluation["after"]["accuracy"] == ours["accuracy"] and evaluation["count"] == ours["count"] == 16
    assert "| this student |" in (export / "README.md").read_text()


def test_export_refuses_what_it_cannot_export_and_leaves_nothing(tmp_path, capsys):
    from dopd_vl.apps.export import export_student

    with pytest.raises(DopdError, match="not a run folder"):
        export_student(tmp_path / "nothing", tmp_path / "out")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"lora": {"enabled": False}}))
    with pytest.raises(DopdError, match="no final student"):
        export_student(run, tmp_path / "out")
    with pytest.raises(DopdError, match="needs a run trained with LoRA"):
        export_student(run, tmp_path / "out", adapter=True)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert main(["export", str(run), "--out", str(tmp_path / "taken")]) == 1
    assert "not empty" in capsys.readouterr().err and (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "taken"]


def test_harness_missing_or_misused_is_one_clear_line(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_lmms(name, *args, **kwargs):
        if name.split(".")[0] == "lmms_eval":
            raise ImportError("No module named 'lmms_eval'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lmms)
    assert main(["eval", "--harness", "lmms-eval", "--model", str(tmp_path), "--tasks", "mmmu_val"]) == 1
    assert "pip install 'dopd-vl[eval-vision]'" in capsys.readouterr().err
    assert main(["eval", "--harness", "lm-eval", "--model", str(tmp_path)]) == 1
    assert "either --tasks" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path)]) == 1
    assert "needs --data" in capsys.readouterr().err


def test_lmms_eval_runs_a_local_records_task_on_the_exported_vision_student(tmp_path):
    """Runs where the lmms-eval extra is installed (not in make test: see docs/design.md §4.7)."""
    pytest.importorskip("lmms_eval", reason="lmms-eval is an optional extra, not installed by make test")
    recipe, data = RECIPES["vision"]
    run = train_run(tmp_path / "run", recipe, data)
    assert (
        main(
            [
                "eval",
                "--harness",
                "lmms-eval",
                "--model",
                str(run),
                "--data",
                str(data),
                "--limit",
                "4",
                "--max-new-tokens",
                "4",
                "--device",
                "cpu",
                "--batch-size",
                "1",
                "--out",
                str(tmp_path / "harness"),
            ]
        )
        == 0
    )
    results = json.loads((tmp_path / "harness" / "lmms_eval_results.json").read_text())
    assert 0.0 <= results["results"]["dopd_records"]["acc,none"] <= 1.0 and len(results["samples"]["dopd_records"]) == 4
    assert "| dopd_records | acc |" in (tmp_path / "harness" / "summary.md").read_text()


def test_the_card_names_only_what_the_project_declares_and_says_which_recipe_keys_to_point_at_copies():
    from dopd_vl.apps.export import model_card

    config = {
        "student": {"name_or_path": "Qwen/Qwen3-1.7B"},
        "teacher": {"name_or_path": "Qwen/Qwen3-8B"},
        "data": {"train": "data/coco128.jsonl", "eval": None},
        "objective": {"name": "dopd", "privileged_student": "live", "top_k": 128},
        "optim": {"batch_size": 4, "gradient_accumulation_steps": 1, "lr": 5e-6},
        "rollout": {"num_generations": 4, "max_new_tokens": 256},
        "lora": {"enabled": False, "r": 16, "alpha": 32},
    }
    summary = {"config": config, "versions": {"dopd_vl": "0.1.0"}, "train_records": 3, "steps": 2, "source": "final"}
    summary.update(final_metrics={}, mean_regime_occupancy={}, collapse_alarms=0, skipped_steps=0)
    card = model_card(summary)
    assert "http" not in card and "pip install 'dopd-vl==" not in card  # nothing the project does not declare
    # A relative data path is a placeholder, said so; hub ids (dots and all) are not.
    assert "in the recipe `data.train` name them as the run did" in card and "`student.name_or_path`" not in card
