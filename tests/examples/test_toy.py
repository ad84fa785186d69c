"""The toy experiment's pipeline at its smallest size (seconds): task, tokenizer, teacher and
student training, distillation through the Trainer, `dopd eval`, table and curves."""

import json
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))

from dopd_vl import build_char_tokenizer  # noqa: E402
from examples.toy_privilege import harness as toy  # noqa: E402
from examples.toy_privilege.task import make_problem, write_split  # noqa: E402

pytestmark = pytest.mark.integration  # see pyproject.toml's markers


def test_task_records_and_char_tokenizer_round_trip():
    import random

    from dopd_vl.data.schema import validate_record

    rng = random.Random(0)
    problems = [make_problem(rng, i) for i in range(200)]
    for p in problems:
        validate_record(p)
        a, b = p["prompt"][0]["content"].rstrip("=").split("+")
        if b == "?":
            assert p["meta"]["question_type"] == "hidden_digit" and int(a) + int(p["privileged_context"][-1]) == int(
                p["answer"]
            )
        else:
            assert p["privileged_context"] == "hint: none" and int(a) + int(b) == int(p["answer"])
    assert 60 < sum(p["meta"]["question_type"] == "hidden_digit" for p in problems) < 140
    tokenizer = build_char_tokenizer()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "7+?=\n\nhint: ?=8"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text and tokenizer.unk_token_id not in ids  # every character is in the vocabulary
    assert tokenizer.eos_token == "<|im_end|>" and len(tokenizer) < 110


@pytest.mark.parametrize("task", ["add_hidden", "two_step"])
def test_toy_pipeline_smoke(tmp_path, task):
    size = toy.TASKS[task].sizes["smoke"]
    specs = [
        ("vanilla_opd", None),
        ("dopd", None),
        ("prune_random=pruned_opd;objective.prune_by=random", None),
        ("dopd_lr0.001=dopd;optim.lr=1e-3", (0,)),
    ]
    if task == "two_step":  # the comparison study's methods go through the same pipeline
        specs += [("eopd", None), ("exopd_plain=exopd;objective.teacher_view=teacher_plain", None)]
    payload = toy.run_methods(tmp_path, task, size, specs)
    table = (tmp_path / "results.md").read_text()
    for row in (
        "| student (start) |",
        "| vanilla_opd |",
        "| dopd |",
        "| teacher, no context |",
        "| teacher, with context |",
        "| random |",
        "| dopd | ",
    ):
        assert row in table
    assert "Mean regime occupancy" in table and "Learning rate" in table and "gain relative" in table
    saved = json.loads((tmp_path / "results.json").read_text())
    extra = {"eopd", "exopd_plain"} if task == "two_step" else set()
    assert (
        set(saved["results"]) == {"vanilla_opd", "dopd", "prune_random", "dopd_lr0.001"} | extra
        and saved["size"]["distill_steps"] == 2
    )
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for method in ("vanilla_opd", "dopd"):
        report = json.loads((tmp_path / "seed0" / "eval" / f"{method}.json").read_text())
        assert report["privileged"] is False and report["count"] == 16
        assert len((tmp_path / "runs" / f"{method}-seed0" / "metrics.jsonl").read_text().splitlines()) == 2
    training = saved["results"]["dopd"]["0"]["training"]
    assert (
        abs(sum(training[f"frac/{r}"] for r in ("LH", "LL", "HT", "HS")) - 1) < 1e-9
        and training["response_length_end"] >= 1
    )
    assert 0.0 <= payload["prepared"][0]["student_start"]["token_accuracy"] <= 1.0
    # --reuse: nothing is trained again, the same table comes back.
    again = toy.run_methods(tmp_path, task, size, specs, reuse=True)
    assert again["table"] == json.loads(json.dumps(payload["table"]))


def test_two_step_task_hints_are_intermediate_results_and_heldout_triples_are_unseen(tmp_path):
    from dopd_vl.data.schema import validate_record
    from dopd_vl.data.sources import load_records

    train = load_records(write_split(tmp_path / "train.jsonl", 2000, seed=1, task="two_step", split_seed=3))
    heldout = load_records(
        write_split(tmp_path / "heldout.jsonl", 1000, seed=2, task="two_step", split_seed=3, split="heldout")
    )
    assert len(heldout) == 145  # 20% of the 729 triples, each once
    seen = {r["prompt"][0]["content"] for r in train}
    assert not seen & {r["prompt"][0]["content"] for r in heldout}
    for r in train[:300] + heldout:
        validate_record(r)
        a, rest = r["prompt"][0]["content"].rstrip("=").split("*")
        b, c = rest.split("+")
        a, b, c = int(a), int(b), int(c)
        assert r["answer"] == str(a * b + c) and r["privileged_context"] == f"hint: {a}*{b}={a * b}"
        assert r["answer"] not in r["privileged_context"].split("=")[-1:]  # the hint never states the final answer
        solution = r["meta"]["solution"]
        assert solution.endswith(f"the answer is {a * b + c}") and 20 <= len(solution) <= 40
        # the blind-spot target: the same hint and first line, the carry dropped on carry problems only
        carry = (a * b) % 10 + c >= 10
        assert r["meta"]["question_type"] == ("carry" if carry else "no_carry")
        blind = r["meta"]["blind_solution"]
        assert blind.endswith(f"the answer is {a * b + c - 10 * carry}")
        assert blind.split("\n")[0] == solution.split("\n")[0] and (blind == solution) == (not carry)


def test_comparison_study_lists_the_paper_methods():
    specs = [spec for spec, _ in toy.study_methods("comparison", toy.TASKS["two_step"], quick=False)]
    assert {toy.parse_method(spec)[1] for spec in specs} == {"vanilla_opd", "privileged_opd", "dopd", "eopd", "exopd"}
    assert "exopd_plain=exopd;objective.teacher_view=teacher_plain" in specs


def test_visual_comparison_pipeline_smoke(tmp_path):
    """examples/visual_privilege at its smallest size: both datasets (boxes, crop), teacher and
    student, Vision-OPD on the crops through the Trainer, held-out evaluation, the table (VA-OPD's
    recipe trains in tests/method/test_comparison_methods.py)."""
    from examples.visual_privilege import run as visual

    size = visual.SIZES["smoke"]
    payload = visual.run(tmp_path, size, ["vision_opd_initial"])
    table = (tmp_path / "results.md").read_text()
    for row in (
        "| student (start) |",
        "| vision_opd_initial |",
        "| teacher with boxes |",
        "| student (start) with the crop |",
    ):
        assert row in table
    assert set(payload["results"]) == {"vision_opd_initial"}
    crop_record = json.loads(open(payload["prepared"][0]["data"]["crop"]["train"]).readline())
    assert crop_record["privileged_context"][1]["type"] == "image"


def test_diagnose_reads_a_toy_recipe_through_the_cli(tmp_path):
    """`dopd diagnose` on the toy's own recipe and models (smoke size): outputs written, the reading
    quotes the installed strength study, and the student's weights on disk are untouched."""
    from dopd_vl.cli import main as dopd

    size = toy.TASKS["two_step"].sizes["smoke"]
    train, _, teacher, student = toy.prepare(tmp_path, "two_step", size, seed=0, device="cpu")
    weights = (student / "model.safetensors").read_bytes()
    out = tmp_path / "diag"
    overrides = [
        f"student.name_or_path={student}",
        f"teacher.name_or_path={teacher}",
        f"data.train={train}",
        "rollout.max_new_tokens=12",
        "optim.batch_size=4",
    ]
    argv = [
        "diagnose",
        str(REPO / "examples" / "toy_privilege" / "config.yaml"),
        *overrides,
        "--steps",
        "2",
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    assert dopd(argv) == 0
    result = json.loads((out / "diagnose.json").read_text())
    assert result["recipe"]["responses_per_step"] == 16 and len(result["steps"]) == 2
    assert 0.0 <= result["summary"]["endorsement"] <= 1.0
    # 8 answered prompts (2 steps x 4) are too few to place among the measured cells: said, and why
    # (a middle student with enough prompts gets the cells: tests/cli/test_diagnose.py).
    assert any("8 answered prompts, fewer than 16" in line for line in result["reading"])
    assert not any("What the measured study says" in line for line in result["reading"])
    assert (student / "model.safetensors").read_bytes() == weights
    # The same figures computed independently from the same rollouts (full-vocabulary forwards).
    from dopd_vl.training.config import load_config

    from helpers.independent_diagnostics import assert_equals_independent_statistics

    config = load_config(REPO / "examples" / "toy_privilege" / "config.yaml", overrides)
    rollouts = [json.loads(line) for line in (out / "diagnose_rollouts.jsonl").read_text().splitlines()]
    assert_equals_independent_statistics(result, rollouts, config, steps=2)


def test_strength_study_pipeline_smoke(tmp_path):
    """The student-strength study at its smallest size: the warm-up calibration, three students
    sharing one teacher, every method with diagnostics, the longer run, the tables, the figure and
    the measured points that `dopd diagnose` quotes."""
    from examples.toy_privilege import strength

    size = toy.TASKS["add_hidden"].sizes["smoke"]
    calibration = strength.calibrate(tmp_path / "add_hidden", "add_hidden", size, "cpu", grid=(1, 2))
    assert set(calibration["chosen"]) <= {1, 2} and (tmp_path / "add_hidden" / "calibration.md").is_file()
    payload = strength.run_study(
        tmp_path / "add_hidden",
        "add_hidden",
        size,
        "cpu",
        warmup=(1, 2, 2),
        methods=strength.METHODS[:1] + strength.METHODS[3:4],
    )
    assert set(payload["levels"]) == {"low", "middle", "high"} and set(payload["long_run"]["heldout_accuracy"]) == set(
        strength.LONG_LABELS
    )
    text = (tmp_path / "add_hidden" / "results.md").read_text()
    assert "The students at the first step" in text and "| low | dopd_initial |" in text and "The longer run" in text
    study = json.loads((tmp_path / "strength_study.json").read_text())
    assert [c["strength"] for c in study["cells"]] == ["low", "middle", "high"] and set(
        study["cells"][0]["gain_over_vanilla"]
    ) == {"dopd_initial"}
    assert (tmp_path / "strength.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
