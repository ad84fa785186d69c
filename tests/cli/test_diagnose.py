"""`dopd diagnose` and the `diag/*` training metrics: the CLI's numbers against a full-vocabulary
recomputation from the same rollouts, weights never touched, the reading."""

import json
import sys

import pytest
import torch

from dopd_vl.training.step import sample_step

from conftest import REPO
from helpers.independent_diagnostics import assert_equals_independent_statistics

sys.path.insert(0, str(REPO))  # examples.toy_privilege
from dopd_vl.cli import main as dopd
from dopd_vl.eval.diagnose import diagnose_run, reading
from dopd_vl.training.config import load_config


@pytest.mark.integration
@pytest.mark.parametrize("recipe", ["tiny_text", "tiny_vlm"])
def test_diagnose_cli_equals_an_independent_full_vocabulary_computation(tmp_path, recipe):
    out = tmp_path / "diag"
    overrides = ["objective.top_k=16"]
    assert (
        dopd(
            [
                "diagnose",
                str(REPO / "configs" / f"{recipe}.yaml"),
                *overrides,
                "--steps",
                "2",
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    result = json.loads((out / "diagnose.json").read_text())
    assert (out / "diagnose.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rollouts = [json.loads(line) for line in (out / "diagnose_rollouts.jsonl").read_text().splitlines()]
    config = load_config(REPO / "configs" / f"{recipe}.yaml", overrides)
    assert len(rollouts) == 2 * config.optim.batch_size * config.rollout.num_generations
    assert_equals_independent_statistics(result, rollouts, config, steps=2)
    assert result["student_weights_unchanged"] is True
    assert "teacher endorsement" in "\n".join(result["reading"])


def test_diagnose_never_changes_the_weights_and_logs_nothing(tmp_path):
    from dopd_vl.training.trainer import Trainer

    config = load_config(
        REPO / "configs" / "tiny_text.yaml",
        [f"output_dir={tmp_path / 'run'}", "objective.privileged_student=live", "diagnostics=true"],
    )
    trainer = Trainer(config)
    before = {k: v.clone() for k, v in trainer.run.models.student.state_dict().items()}
    result = diagnose_run(trainer.run, steps=2, progress=False)
    after = trainer.run.models.student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not trainer.run.optimizer.state and trainer.step == 0 and not (tmp_path / "run").exists()
    assert result["recipe"]["privileged_student"] == "live" and len(result["steps"]) == 2


@pytest.mark.integration
def test_training_diagnostics_log_diag_metrics_and_leave_training_unchanged(tmp_path):
    from dopd_vl.training.trainer import Trainer

    losses = {}
    for diagnostics in (False, True):
        config = load_config(
            REPO / "configs" / "tiny_text.yaml",
            [
                f"output_dir={tmp_path / str(diagnostics)}",
                "objective.name=vanilla_opd",
                "max_steps=2",
                f"diagnostics={str(diagnostics).lower()}",
            ],
        )
        trainer = Trainer(config)
        rows = [
            trainer.train_step(sample_step(trainer.run, trainer.step)) for _ in range(2)
        ]  # the loop's step, without saving
        losses[diagnostics] = [(r["loss"], r["grad_norm"]) for r in rows]
        diag = [k for k in rows[0] if k.startswith("diag/")]
        if diagnostics:
            assert {
                "diag/endorsement",
                "diag/frac/HT",
                "diag/edge_check/frac/HT",
                "diag/information_edge/mean",
                "diag/information_edge/above_1nat",
            } <= set(diag)
            assert sum(rows[0][f"diag/frac/{g}"] for g in ("LH", "LL", "HT", "HS")) == pytest.approx(1.0)
        else:
            assert diag == []
    assert losses[True] == losses[False]


def test_the_python_api_is_dopd_vl_diagnose():
    import dopd_vl
    from dopd_vl.eval.diagnose import diagnose

    assert dopd_vl.diagnose is diagnose


STUDY = {
    "source": "a study",
    "scope": "two cells",
    "caveat": "tiny models.",
    "variants": {"dopd_initial": "DOPD, initial"},
    "cells": [
        {
            "task": "t",
            "strength": "low",
            "start_relative": [0.2, 0.3],
            "first_step": {"endorsement": [0.30, 0.40], "frac/HT": [0.01, 0.02]},
            "gain_over_vanilla": {"dopd_initial": [-0.2, -0.1]},
        },
        {
            "task": "t",
            "strength": "high",
            "start_relative": [0.7, 0.8],
            "first_step": {"endorsement": [0.70, 0.80], "frac/HT": [0.05, 0.06]},
            "gain_over_vanilla": {"dopd_initial": [0.05, -0.05]},
        },
    ],
    "beats_vanilla": [],
}


@pytest.mark.parametrize(
    "endorsement, inside, nearest",
    [(0.33, True, "low"), (0.72, True, "high"), (0.95, False, "high"), (0.1, False, "low")],
)
def test_reading_places_the_numbers_among_the_measured_cells(endorsement, inside, nearest):
    summary = {
        "endorsement": endorsement,
        "frac/HT": 0.03,
        "response_length": 3.0,
        "clipped_frac": 0.0,
        "eos_only_frac": 0.0,
        "information_edge/mean": 0.1,
        "information_edge/above_1nat": 0.0,
        "capability_edge/mean": -0.5,
        "advantage_gap/mean": 0.4,
        **{f"{p}/{g}": 0.25 for p in ("frac", "edge_check/frac", "route") for g in ("LH", "LL", "HS")},
        "edge_check/frac/HT": 0.25,
        "route/HT": 0.03,
    }
    result = {
        "summary": summary,
        "steps": [summary],
        "tokens": 10,
        "route_names": ["LH", "LL", "HT", "HS"],
        "recipe": {
            "steps": 1,
            "responses_per_step": 4,
            "student": "s",
            "data": "d",
            "teacher": "t",
            "objective": "dopd",
            "privileged_student": "initial",
            "max_new_tokens": 4,
        },
    }
    text = "\n".join(reading(result, STUDY))
    assert (f"Yours, at your first step ({endorsement:.3f}), is inside that range" in text) == inside
    assert (f"Yours, at your first step ({endorsement:.3f}), is outside anything measured" in text) == (not inside)
    assert f"t / {nearest} student" in text
    assert "In no measured cell did a DOPD configuration beat vanilla OPD" in text and "tiny models." in text


def test_the_installed_study_is_the_committed_strength_study():
    """dopd diagnose quotes dopd_vl/assets/strength_study.json: exactly the measured points the
    strength study wrote (examples/toy_privilege/results/strength), nothing edited by hand."""
    from dopd_vl.eval.diagnose import measured_study

    committed = json.loads(
        (REPO / "examples" / "toy_privilege" / "results" / "strength" / "strength_study.json").read_text()
    )
    assert measured_study("strength") == committed
    payloads = [
        json.loads((REPO / "examples" / "toy_privilege" / "results" / "strength" / t / "results.json").read_text())
        for t in ("add_hidden", "two_step")
    ]
    from examples.toy_privilege import strength  # noqa: E402 - the study's own summary of its results

    assert [cell for payload in payloads for cell in strength.study_cells(payload)] == committed["cells"]


def test_the_installed_trust_study_is_the_committed_trust_study():
    """dopd diagnose quotes dopd_vl/assets/trust_study.json: the trust study's own summary of its
    committed results (examples/toy_privilege/results/trust), nothing edited by hand."""
    from dopd_vl.eval.diagnose import measured_study
    from examples.toy_privilege import trust  # noqa: E402 - the study's own summary of its results

    results = REPO / "examples" / "toy_privilege" / "results" / "trust"
    committed = json.loads((results / "trust_study.json").read_text())
    assert measured_study("trust") == committed
    assert trust.study_summary(json.loads((results / "two_step" / "results.json").read_text())) == committed
    assert [cell["teacher"] for cell in committed["cells"]] == list(trust.TEACHERS)


TRUST = {
    "source": "the trust study",
    "scope": "two cells",
    "caveat": "Tiny models.",
    "methods": {"dopd_initial": "DOPD initial", "hs_to_teacher": "HS to the teacher"},
    "cells": [
        {
            "teacher": "clean",
            "student_accuracy": [0.70, 0.70],
            "teacher_priv_accuracy": [0.95, 1.00],
            "teacher_plain_accuracy": [0.9, 0.9],
            "hs_precision": [0.1, None],
            "hs_share_correct": [0.02, 0.04],
            "hs_share_wrong": [0.10, 0.20],
            "gain_over_vanilla": {"dopd_initial": [-0.05, -0.03], "hs_to_teacher": [0.01, 0.01]},
            "carry_gain_over_vanilla": {"dopd_initial": [0.0, 0.0], "hs_to_teacher": [0.0, 0.02]},
        },
        {
            "teacher": "blind",
            "student_accuracy": [0.70, 0.70],
            "teacher_priv_accuracy": [0.55, 0.65],
            "teacher_plain_accuracy": [0.4, 0.4],
            "hs_precision": [0.6, 0.8],
            "hs_share_correct": [0.10, 0.12],
            "hs_share_wrong": [0.05, 0.07],
            "gain_over_vanilla": {"dopd_initial": [0.40, 0.42], "hs_to_teacher": [0.0, 0.02]},
            "carry_gain_over_vanilla": {"dopd_initial": [0.80, 0.84], "hs_to_teacher": [0.0, 0.0]},
        },
    ],
}


@pytest.mark.parametrize(
    "teacher, share_right, nearest, lead_inside, right_inside",
    [(0.97, 0.03, "clean", True, True), (0.6, None, "blind", True, None), (0.3, 0.5, "blind", False, False)],
)
def test_trust_reading_places_the_answers_among_the_measured_cells(
    teacher, share_right, nearest, lead_inside, right_inside
):
    """The lead (privileged teacher minus student) and the HS shares are placed inside or outside
    the measured range (-0.150 to +0.300, 0.020 to 0.120); the nearest cell's gains are quoted."""
    from dopd_vl.eval.trust import trust_reading

    answers = {
        "student_accuracy": 0.7,
        "teacher_priv_accuracy": teacher,
        "teacher_plain_accuracy": 0.5,
        "hs_share_correct": share_right,
        "hs_share_wrong": 0.06,
        "n": 8,
    }
    text = "\n".join(trust_reading(answers, TRUST))
    lead = f"{teacher - 0.7:+.3f}"
    assert "measured, per cell clean teacher +0.275 ± 0.035; blind teacher -0.100 ± 0.071" in text
    placed = "inside that range" if lead_inside else "outside anything measured"
    assert f"Yours, on the sampled prompts, is {lead}: {placed}" in text
    if right_inside is None:
        assert "you have no such responses" in text
    else:
        placed = "inside that range" if right_inside else "outside anything measured"
        assert f"yours is {share_right:.3f}: {placed}" in text
    assert "clean teacher 0.100; blind teacher 0.700 ± 0.141" in text  # HS precision, None seeds left out
    gains = {"clean": "dopd_initial -0.040 ± 0.014", "blind": "dopd_initial +0.410 ± 0.014"}
    assert f"Nearest measured cell by the teacher's lead: the {nearest} teacher" in text and gains[nearest] in text
    assert text.endswith("Tiny models.")


@pytest.mark.parametrize("objective", ["vanilla_opd", "eopd", "pruned_opd"])
def test_diagnose_reads_every_objective_and_reports_its_routes(tmp_path, objective):
    """Objectives that route otherwise (one route, a split on the teacher's entropy, pruning) are
    diagnosed too: their own route shares beside DOPD's regimes, which they do not use."""
    from dopd_vl.training.trainer import Trainer

    config = load_config(
        REPO / "configs" / "tiny_text.yaml",
        [f"output_dir={tmp_path}", f"objective.name={objective}", "diagnostics=true", "objective.top_k=16"],
    )
    result = diagnose_run(Trainer(config).run, steps=1, progress=False)
    routes = {k: v for k, v in result["summary"].items() if k.startswith("route/")}
    names = {
        "vanilla_opd": {"route/vanilla_opd"},
        "eopd": {"route/low_teacher_entropy", "route/high_teacher_entropy"},
        "pruned_opd": {"route/pruned_opd", "route/dropped"},
    }[objective]
    assert set(routes) == names and sum(routes.values()) == pytest.approx(1.0)
    assert sum(result["summary"][f"frac/{g}"] for g in ("LH", "LL", "HT", "HS")) == pytest.approx(1.0)
    assert result["recipe"]["objective"] == objective and f"routes of {objective}" in "\n".join(result["reading"])


def test_diagnose_reads_who_is_right_equal_to_an_independent_count(tmp_path):
    """`answers`: greedy accuracies of the student and both teacher views on the sampled prompts, and
    the HS share in right vs wrong sampled responses, against plain `generate` calls and the
    full-vocabulary regimes of the same rollouts. Each record's answer is set to one of its own
    sampled responses (sampling does not read answers), so both right and wrong responses occur."""
    from dopd_vl.data.answers import is_correct
    from dopd_vl.training.trainer import Trainer

    from helpers.independent_diagnostics import independent_statistics
    from helpers.runs import ARITH

    def run(data, out):
        config = load_config(
            REPO / "configs" / "tiny_text.yaml",
            [f"output_dir={tmp_path / 'run'}", f"data.train={data}", "diagnostics=true"],
        )
        trainer = Trainer(config)
        result = diagnose_run(trainer.run, steps=2, out=out, progress=False)
        rollouts = [json.loads(line) for line in (out / "diagnose_rollouts.jsonl").read_text().splitlines()]
        return config, trainer, result, rollouts

    _, trainer, _, first = run(ARITH, tmp_path / "first")

    def text(ids) -> str:
        return trainer.run.tokenizer.decode(ids, skip_special_tokens=True).strip()

    records = {r["id"]: r for r in (json.loads(line) for line in ARITH.read_text().splitlines())}
    answered = set()
    for r in first:  # each sampled record's answer: its first non-empty sampled response
        if text(r["response_ids"]) and r["id"] not in answered:
            records[r["id"]]["answer"] = text(r["response_ids"])
            answered.add(r["id"])
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records.values()))
    config, trainer, result, rollouts = run(data, tmp_path / "diag")
    assert [r["response_ids"] for r in rollouts] == [r["response_ids"] for r in first]
    answers, m = result["answers"], trainer.run.models

    @torch.no_grad()
    def greedy(model, adapter, record, view) -> str:
        ids = adapter.prompt(record, view).input_ids[None]
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
            max_new_tokens=config.rollout.max_new_tokens, eos_token_id=m.eos_token_ids,
            suppress_tokens=m.suppress_ids or None, pad_token_id=m.eos_token_ids[0],
        )  # fmt: skip
        return text(out[0, ids.shape[1] :])

    sampled = [records[i] for i in dict.fromkeys(r["id"] for r in rollouts)]
    expected = {
        "student_accuracy": (m.student, "student", "student"),
        "teacher_priv_accuracy": (m.teacher, "teacher", "teacher_priv"),
        "teacher_plain_accuracy": (m.teacher, "teacher", "teacher_plain"),
    }
    for key, (model, adapter, view) in expected.items():
        right = [is_correct(greedy(model, trainer.run.data.adapters[adapter], r, view), r["answer"]) for r in sampled]
        assert answers[key] == pytest.approx(sum(right) / len(sampled), abs=1e-12), key
    assert answers["n"] == len(sampled)

    regimes, correct = [], []
    for step, ref in enumerate(independent_statistics(rollouts, config, steps=2), start=1):
        regimes += ref["paper"]
        for r in (r for r in rollouts if r["step"] == step):
            correct += [is_correct(text(r["response_ids"]), records[r["id"]]["answer"])] * len(r["response_ids"])
    assert len(regimes) == len(correct) == result["tokens"] and any(correct) and not all(correct)
    for key, want in (("hs_share_correct", True), ("hs_share_wrong", False)):
        picked = [g for g, c in zip(regimes, correct) if c == want]
        assert answers[key] == pytest.approx(picked.count(3) / len(picked), abs=1e-12), key
    # What objective.trust: verified would move (docs/design.md §1.12), from the teacher's greedy verdicts
    teacher_right = {
        r["id"]: is_correct(greedy(m.teacher, trainer.run.data.adapters["teacher"], r, "teacher_priv"), r["answer"])
        for r in sampled
    }
    owners = [r["id"] for r in rollouts for _ in r["response_ids"]]
    to_hs = sum(not teacher_right[i] and g != 3 for i, g in zip(owners, regimes))
    to_lh = sum(teacher_right[i] and not c and g in (1, 3) for i, g, c in zip(owners, regimes, correct))
    moved = answers["verified_overrides"]
    assert moved["trust/teacher_wrong"] == pytest.approx(to_hs / len(regimes), abs=1e-12)
    assert moved["trust/wrong_response"] == pytest.approx(to_lh / len(regimes), abs=1e-12)
    assert "objective.trust: verified would move" in "\n".join(result["reading"])
    text = "\n".join(result["reading"])
    # The answers are read; 4 answered prompts are too few to place among the measured cells: said, and why.
    assert "answers on the" in text and f"{answers['n']} answered prompts, fewer than 16" in text
    assert "No recommendation" in text and "What the trust study measured" not in text


def _diagnosis(clipped: float, accuracies: tuple[float, float, float] | None, n: int = 32) -> dict:
    summary = {
        "endorsement": 0.72,
        "frac/HT": 0.05,
        "response_length": 8.0,
        "clipped_frac": clipped,
        "eos_only_frac": 0.0,
        "information_edge/mean": 0.3,
        "information_edge/above_1nat": 0.05,
        "capability_edge/mean": 0.2,
        "advantage_gap/mean": 0.4,
        **{f"{p}/{g}": 0.25 for p in ("frac", "edge_check/frac", "route") for g in ("LH", "LL", "HT", "HS")},
    }
    recipe = {"steps": 4, "responses_per_step": 16, "prompts_per_step": 4, "student": "s", "data": "d"}
    recipe.update(teacher="t", objective="dopd", privileged_student="initial", max_new_tokens=8)
    result = {"summary": summary, "steps": [summary], "tokens": 512, "route_names": ["LH", "LL", "HT", "HS"]}
    result["recipe"] = recipe
    if accuracies is not None:
        student, priv, plain = accuracies
        result["answers"] = {
            "student_accuracy": student,
            "teacher_priv_accuracy": priv,
            "teacher_plain_accuracy": plain,
            "hs_share_correct": 0.05,
            "hs_share_wrong": 0.1,
            "n": n,
        }
    return result


def test_answers_that_are_all_wrong_and_cut_get_no_recommendation_and_say_why():
    """Every accuracy 0 and every response cut: the reading states what it read, withholds the
    measured cells and says why and what to change."""
    text = "\n".join(reading(_diagnosis(clipped=1.0, accuracies=(0.0, 0.0, 0.0)), STUDY, TRUST))
    assert "read: 4 step(s), 16 prompts, 32 of them with an answer, 64 responses, 512 response tokens" in text
    assert "No recommendation" in text and "100% of the responses were cut at max_new_tokens (8)" in text
    assert "raise rollout.max_new_tokens" in text and "all answer 0% of the prompts right" in text
    assert "What the measured study says" not in text and "Nearest measured cell" not in text


def test_a_middle_student_still_gets_the_measured_cells():
    """The toy study's middle student (right on about half the prompts, the teacher ahead, answers not
    cut) is placed among the measured cells as before."""
    text = "\n".join(reading(_diagnosis(clipped=0.1, accuracies=(0.5, 0.8, 0.6))))  # the installed studies
    assert "No recommendation" not in text
    assert "What the measured study says" in text and "What the trust study measured" in text
    assert "The measured cell nearest by endorsement is" in text


def test_too_few_answered_prompts_get_no_recommendation():
    text = "\n".join(reading(_diagnosis(clipped=0.0, accuracies=(0.5, 0.8, 0.6), n=8), STUDY, TRUST))
    assert "8 answered prompts, fewer than 16" in text and "read more with --steps" in text


def test_the_printed_reading_fits_a_terminal_and_its_share_columns_align():
    from dopd_vl.eval.diagnose import terminal_reading

    lines = reading(_diagnosis(clipped=0.1, accuracies=(0.5, 0.8, 0.6)), STUDY, TRUST)
    printed = terminal_reading(lines).splitlines()
    assert max(len(line) for line in printed) <= 100 and any(len(line) > 100 for line in lines)
    table = [line for line in printed if line.startswith(("regimes (token shares)", "  the paper's rule"))]
    header, row = table
    for name in ("LH", "LL", "HT", "HS"):  # each share ends under its column's name
        assert row[header.index(name) + len(name) - 5 : header.index(name) + len(name)] == "0.250"


def test_box_scores_of_a_detectors_dataset_are_read_and_said():
    """A grounding dataset built from a detector's predictions: `dopd diagnose` reports the boxes'
    score quartiles and the share below 0.5, beside the teacher with vs without the boxes."""
    from dopd_vl.eval.diagnose import box_scores, reading

    records = [
        {"privileged": {"objects": [{"label": "a", "score": s} for s in scores]}}
        for scores in ([0.1, 0.9], [0.5], [0.3, 0.7, 0.95])
    ] + [{"privileged": {"objects": [{"label": "gt"}]}}, {"prompt": []}]
    stats = box_scores(records)
    assert stats["boxes"] == 7 and stats["scored"] == 6
    assert stats["quartiles"] == pytest.approx([0.1, 0.35, 0.6, 0.85, 0.95])
    assert stats["below_0.5"] == pytest.approx(2 / 6)
    assert box_scores([{"privileged": {"objects": [{"label": "gt"}]}}]) is None
    result = _diagnosis(0.0, (0.5, 0.9, 0.6))
    result["box_scores"] = stats
    text = "\n".join(reading(result))
    assert "box scores (detector confidence) of 6 of 7 privileged boxes: min 0.10, quartiles 0.35 / 0.60 / 0.85" in text
    assert "the teacher with the boxes answers 0.900, without them 0.600" in text
