"""The collapse guard (dopd_vl/training/guard.py): unit cases on metric sequences, and real training runs
through the Trainer that collapse by construction (a teacher that only ends the answer, a teacher
whose output is uniform) or stay healthy, with `collapse_action` warn and stop."""

import json
import logging

import pytest
import torch

from dopd_vl.training.guard import CollapseGuard, CollapseGuardConfig

SMALL = CollapseGuardConfig(baseline_steps=4, window=4, patience=2)


pytestmark = pytest.mark.xdist_group("guard_toy_models")  # with --dist loadgroup: one worker builds its fixture


def feed(guard, rows):
    alarms = []
    for step, row in enumerate(rows, start=1):
        alarm = guard.update({"step": step, **row})
        if alarm is not None:
            alarms.append(alarm)
    return alarms


def healthy_rows(n=40):
    # Noisy but healthy: accuracy rises, entropy falls (a student that learns gets confident).
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        noise = float(torch.rand((), generator=g)) - 0.5
        rows.append(
            {
                "response_length": 30 + 3 * noise,
                "eos_only_frac": 0.0,
                "entropy/student": 1.2 * (1 - i / (1.5 * n)) + 0.1 * noise,
                "accuracy": min(0.9, 0.3 + i / n * 0.5 + 0.05 * noise),
                "loss": 0.5 - i / (3 * n),
            }
        )
    return rows


def test_healthy_sequence_raises_no_alarm():
    assert feed(CollapseGuard(SMALL), healthy_rows()) == []
    assert feed(CollapseGuard(), healthy_rows(200)) == []  # defaults


def test_end_token_only_responses_are_a_length_collapse_after_patience():
    rows = [{"response_length": 2.5, "eos_only_frac": 0.0, "entropy/student": 1.0, "accuracy": 0.35}] * 4
    rows += [{"response_length": 1.0, "eos_only_frac": 1.0, "entropy/student": 0.3, "accuracy": 0.0}] * 10
    (alarm,) = feed(CollapseGuard(SMALL), rows)
    # Recent window = last 4 steps after the 4 reference steps; the sign holds from step 5 on,
    # patience 2 confirms it at step 6.
    assert alarm.step == 6 and alarm.kinds[0] == "length" and "accuracy" in alarm.kinds
    assert alarm.evidence["eos_only_frac"] == (0.0, 1.0) and alarm.evidence["response_length"] == (2.5, 1.0)
    assert "step 6" in alarm.describe() and "length" in alarm.describe()


def test_near_uniform_output_is_an_entropy_collapse():
    rows = [{"response_length": 4.0, "entropy/student": 1.0}] * 4 + [
        {"response_length": 4.0, "entropy/student": 4.3}
    ] * 6
    (alarm,) = feed(CollapseGuard(SMALL), rows)
    assert alarm.kinds == ["entropy"] and alarm.evidence["entropy/student"] == (1.0, 4.3)


def test_entropy_rise_needs_both_ratio_and_margin():
    # 0.1 -> 0.5 nats is 5x but only 0.4 nats: not near-uniform output.
    rows = [{"entropy/student": 0.1}] * 4 + [{"entropy/student": 0.5}] * 10
    assert feed(CollapseGuard(SMALL), rows) == []


def test_accuracy_collapse_with_full_length_confident_output():
    rows = [{"response_length": 29.0, "entropy/student": 2.2, "accuracy": 0.2}] * 4
    rows += [{"response_length": 30.0, "entropy/student": 0.35, "accuracy": 0.0}] * 6
    (alarm,) = feed(CollapseGuard(SMALL), rows)
    assert alarm.kinds == ["accuracy"] and alarm.evidence["entropy/student"] == (2.2, 0.35)


def test_accuracy_too_low_to_judge_is_ignored_and_a_short_blip_is_not_confirmed():
    rows = [{"accuracy": 0.02}] * 4 + [{"accuracy": 0.0}] * 10
    assert feed(CollapseGuard(SMALL), rows) == []
    blip = (
        [{"response_length": 10.0}] * 4
        + [{"response_length": 10.0}] * 3
        + [{"response_length": 0.5}]
        + [{"response_length": 10.0}] * 6
    )
    assert feed(CollapseGuard(CollapseGuardConfig(baseline_steps=4, window=1, patience=2)), blip) == []


def test_guard_state_round_trips_for_resume():
    guard = CollapseGuard(SMALL)
    feed(guard, [{"response_length": 3.0}] * 5)
    restored = CollapseGuard(SMALL)
    restored.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert restored.history == guard.history and restored.streak == guard.streak


def test_invalid_guard_settings_are_config_errors():
    from dopd_vl.errors import ConfigError
    from dopd_vl.training.config import load_config

    with pytest.raises(ConfigError, match="collapse_action"):
        load_config(None, ["collapse_action=panic"])
    with pytest.raises(ConfigError, match="length_ratio"):
        load_config(None, ["collapse_guard.length_ratio=2"])
    assert load_config(None, ["collapse_guard.patience=7"]).collapse_guard.patience == 7


# ------------------------------------------------------------------ real runs through the Trainer
@pytest.fixture(scope="session")  # once per worker: xdist may interleave other modules between its tests
def toy_models(tmp_path_factory):
    """The toy task's char tokenizer; a student trained to answer (confident, 2-3 token answers),
    a teacher trained the same way, a teacher that answers with the end token only, and a teacher
    whose output is uniform (zero output layer)."""
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO))
    from dopd_vl import build_char_tokenizer
    from dopd_vl.data.sources import load_records
    from dopd_vl.modality.adapters import make_adapter
    from dopd_vl.models.loading import load_model
    from dopd_vl.models.tiny import build_tiny_qwen3
    from dopd_vl.training.sft import SFTConfig, supervised_finetune
    from examples.toy_privilege.task import write_split

    root = tmp_path_factory.mktemp("guard")
    tokenizer = build_char_tokenizer()
    data = write_split(root / "train.jsonl", 200, seed=0)
    records = load_records(data)
    adapter = make_adapter(tokenizer)
    made = {}
    for name, seed in (("student", 2), ("teacher", 3), ("eos_teacher", 4), ("uniform_teacher", 5)):
        folder = build_tiny_qwen3(
            root / name,
            tokenizer=tokenizer,
            hidden_size=32,
            num_layers=1,
            num_heads=2,
            num_kv_heads=1,
            intermediate_size=64,
            lm_head_rows=0,
            seed=seed,
        )
        model = load_model(folder)
        if name == "eos_teacher":
            train = [{**r, "answer": ""} for r in records]  # answer = the end token alone
        else:
            train = records
        if name != "uniform_teacher":
            supervised_finetune(
                model,
                adapter,
                train,
                len(tokenizer),
                SFTConfig(steps=60, batch_size=32, lr=3e-3, views=("student", "student_priv"), seed=seed),
            )
        else:
            with torch.no_grad():
                model.get_output_embeddings().weight.zero_()  # tied: every logit 0, uniform output
        model.save_pretrained(folder, safe_serialization=True)
        made[name] = folder
    made["data"] = data
    return made


def guarded_run(toy_models, tmp_path, teacher, action, lr, steps=24):
    from dopd_vl.training.config import load_config
    from dopd_vl.training.trainer import Trainer

    config = load_config(
        None,
        [
            f"student.name_or_path={toy_models['student']}",
            f"teacher.name_or_path={toy_models[teacher]}",
            f"data.train={toy_models['data']}",
            f"output_dir={tmp_path / teacher}",
            "objective.name=vanilla_opd",
            "objective.top_k=16",
            "objective.baseline_support=full",
            f"max_steps={steps}",
            "save_steps=1000",
            "rollout.num_generations=2",
            "rollout.max_new_tokens=4",
            "optim.batch_size=8",
            f"optim.lr={lr}",
            f"collapse_action={action}",
            "collapse_guard.baseline_steps=2",
            "collapse_guard.window=3",
            "collapse_guard.patience=2",
        ],
    )
    return Trainer(config)


def alarms_in(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows, [r["step"] for r in rows if r["collapse_alarm"]]


def test_length_collapse_is_detected_in_a_real_run_and_warned_once(toy_models, tmp_path, caplog):
    trainer = guarded_run(toy_models, tmp_path, "eos_teacher", "warn", lr=3e-2)
    with caplog.at_level(logging.WARNING, logger="dopd_vl.training.trainer"):
        trainer.train()
    rows, alarm_steps = alarms_in(tmp_path / "eos_teacher")
    assert len(rows) == 24 and len(alarm_steps) == 1  # warned once, training went on
    warnings = [r.getMessage() for r in caplog.records if "collapse guard" in r.getMessage()]
    assert (
        len(warnings) == 1
        and "length" in warnings[0]
        and "optim.lr" in warnings[0]
        and "Training goes on" in warnings[0]
    )
    assert (
        rows[alarm_steps[0] - 1]["eos_only_frac"] >= 0.5 and rows[0]["eos_only_frac"] < 0.25
    )  # real metrics, not a constructed table


def test_entropy_collapse_stops_the_run_after_a_clean_checkpoint(toy_models, tmp_path):
    from transformers import AutoModelForCausalLM

    from dopd_vl.errors import CollapseDetected

    trainer = guarded_run(toy_models, tmp_path, "uniform_teacher", "stop", lr=2e-3)
    with pytest.raises(CollapseDetected, match="entropy") as caught:
        trainer.train()
    rows, alarm_steps = alarms_in(tmp_path / "uniform_teacher")
    assert alarm_steps == [len(rows)] and len(rows) < 24  # stopped at the alarm
    checkpoint = tmp_path / "uniform_teacher" / f"checkpoint-{len(rows)}"
    assert f"checkpoint-{len(rows)}" in str(caught.value) and (checkpoint / "state.json").exists()
    assert json.loads((checkpoint / "state.json").read_text())["guard"]["alarmed"] is True
    AutoModelForCausalLM.from_pretrained(checkpoint / "model")  # loadable
    assert not (tmp_path / "uniform_teacher" / "final").exists()


@pytest.mark.parametrize("action", ["warn", "stop"])
def test_healthy_run_raises_no_alarm(toy_models, tmp_path, action):
    trainer = guarded_run(toy_models, tmp_path / action, "teacher", action, lr=1e-3)
    trainer.train()
    rows, alarm_steps = alarms_in(tmp_path / action / "teacher")
    assert len(rows) == 24 and alarm_steps == []


def test_responses_that_stop_stopping_are_a_length_collapse():
    # Seen on two_step: DOPD's live privileged student lets answers run into max_new_tokens.
    rows = [{"response_length": 31.0, "clipped_frac": 0.05, "entropy/student": 0.35, "accuracy": 0.25}] * 4
    rows += [{"response_length": 38.5, "clipped_frac": 0.9, "entropy/student": 0.4, "accuracy": 0.03}] * 6
    (alarm,) = feed(CollapseGuard(SMALL), rows)
    assert alarm.kinds == ["length", "accuracy"] and alarm.evidence["clipped_frac"] == (0.05, 0.9)


def test_noisy_accuracy_of_a_weak_student_is_no_alarm():
    # Seen on two_step seed 1: sampled accuracy around 0.1 that dips to 0.03 for a while in healthy
    # runs (vanilla OPD ended above its start); halving a small number is not a collapse.
    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(60):
        dip = 0.06 if 15 <= i < 35 else 0.0
        rows.append(
            {
                "response_length": 31 + float(torch.rand((), generator=g)),
                "clipped_frac": 0.05,
                "entropy/student": 0.5,
                "accuracy": max(0.0, 0.11 - dip + 0.04 * (float(torch.rand((), generator=g)) - 0.5)),
            }
        )
    assert feed(CollapseGuard(), rows) == []
