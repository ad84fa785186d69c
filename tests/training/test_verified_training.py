"""Verified distillation end to end on the tiny text models (docs/design.md §1.12): the teacher's
verdicts once per run (equal to a plain `generate` + `is_correct`, reused on resume), verifiers
from Python and from a recipe reaching the step's metrics, the teacher filter, `dopd verify-teacher`,
and the one-line errors."""

import json

import pytest
import torch

from dopd_vl import VERIFIERS, DatasetError, Trainer, is_correct, register_verifier
from dopd_vl.training.step import sample_step

from helpers.runs import ARITH, read_metrics, run_steps, text_config

SMALL = ["rollout.max_new_tokens=4", "max_steps=2", "save_steps=1"]


def _records(n: int = 8) -> list[dict]:
    return [json.loads(line) for line in ARITH.read_text().splitlines()[:n]]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.integration
def test_teacher_verdicts_equal_plain_generate_and_are_computed_once(tmp_path, monkeypatch):
    """The run's verdicts equal a plain greedy `generate` of the teacher on its privileged prompt
    checked by `is_correct`; some records get the teacher's own answer as `answer`, so both
    verdicts occur. A resumed run reads them back: no teacher generation the second time."""
    import dopd_vl.training.run as run_module

    records = _records()
    probe = Trainer(text_config(tmp_path / "probe", f"data.train={_write(tmp_path / 'all.jsonl', records)}", *SMALL))
    models, adapter = probe.run.models, probe.run.data.adapters["teacher"]

    def plain_greedy(record) -> str:
        prompt = adapter.prompt(record, "teacher_priv").input_ids[None]
        out = models.teacher.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=4,
            eos_token_id=models.eos_token_ids,
            pad_token_id=adapter.pad_token_id,
            suppress_tokens=models.suppress_ids or None,
        )[0, prompt.shape[1] :]
        eos = torch.isin(out, torch.tensor(models.eos_token_ids)).nonzero()
        out = out[: int(eos[0]) + 1] if len(eos) else out
        return adapter.tokenizer.decode(out, skip_special_tokens=True).strip()

    answers = [plain_greedy(r) for r in records]
    spoken = [i for i, a in enumerate(answers) if a]  # the tiny teacher may answer nothing at all
    for i in spoken[::2]:
        records[i]["answer"] = answers[i]
    data = _write(tmp_path / "data.jsonl", records)
    expected = [is_correct(answers[i], r["answer"]) for i, r in enumerate(records)]
    assert any(expected) and not all(expected)

    calls = []
    real = run_module.teacher_answers
    monkeypatch.setattr(run_module, "teacher_answers", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = tmp_path / "run"
    overrides = [f"data.train={data}", "objective.trust=verified", *SMALL]
    Trainer(text_config(out, *overrides, "max_steps=1")).train()
    rows = [json.loads(line) for line in (out / "teacher_verdicts.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    assert [r["response"] for r in rows] == answers
    assert [r["verdict"] for r in rows] == expected
    assert len(calls) == 1
    resumed = Trainer(text_config(out, *overrides))
    resumed.train(resume=True)
    assert len(calls) == 1  # read back, not generated again
    assert resumed.run.data.teacher_verdicts == {r["id"]: r["verdict"] for r in rows}
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(0 <= m["trust/teacher_wrong"] <= 1 and "trust/wrong_response" in m for m in metrics)


@pytest.mark.integration
def test_verifiers_from_python_and_from_a_recipe_reach_the_step(tmp_path):
    """A verifier named `module:function` in the recipe decides the verdicts a training run logs
    (verify/*) and the routing `trust: verified` applies (trust/*); one registered in Python decides
    the step's rollout metrics the same way."""
    from dopd_vl.training.rollout import rollout_metrics

    data = _write(tmp_path / "data.jsonl", _records())

    def sampled_share(run, right) -> float:
        ids = [int(mb.records[i]["id"][-1]) for mb in sample_step(run, 0) for i in mb.rollout.record_index]
        return sum(i in right for i in ids) / len(ids)

    out = tmp_path / "trust"
    overrides = ["data.verifier=helpers.verifiers:even_ids", "objective.trust=verified", *SMALL, "max_steps=1"]
    trainer = Trainer(text_config(out, f"data.train={data}", *overrides))
    trainer.train()
    (metrics,) = read_metrics(out)
    share = sampled_share(trainer.run, {0, 2, 4, 6})
    assert 0 < share < 1 and metrics["verify/correct"] == pytest.approx(share)
    assert metrics["verify/wrong"] == pytest.approx(1 - share) and metrics["verify/none"] == 0.0
    assert trainer.run.data.teacher_verdicts == {r["id"]: int(r["id"][-1]) % 2 == 0 for r in _records()}
    assert metrics["trust/teacher_wrong"] > 0  # tokens of odd records that the paper's rule kept off HS
    register_verifier("first_half_for_test", lambda response, record: int(record["id"][-1]) < 4)
    try:
        run = Trainer(text_config(tmp_path / "py", f"data.train={data}", "data.verifier=first_half_for_test")).run
        metrics = rollout_metrics(sample_step(run, 0), run.tokenizer)
        share = sampled_share(run, {0, 1, 2, 3})
        assert 0 < share < 1 and metrics["verify/correct"] == pytest.approx(share)
        assert run.data.teacher_verdicts is None  # trust: paper reads none
    finally:
        VERIFIERS.pop("first_half_for_test")


@pytest.mark.integration
def test_teacher_filter_trains_exactly_on_the_verified_records(tmp_path):
    """`data.teacher_filter: verified` with even ids verified: the run's records are the even ones,
    and its first step equals (to the bit) a plain run on a file holding only those records."""
    records = _records()
    data = _write(tmp_path / "data.jsonl", records)
    kept = _write(tmp_path / "kept.jsonl", [r for r in records if int(r["id"][-1]) % 2 == 0])
    common = ["data.verifier=helpers.verifiers:even_ids", "objective.name=vanilla_opd", *SMALL]
    filtered = Trainer(text_config(tmp_path / "f", f"data.train={data}", "data.teacher_filter=verified", *common))
    filtered.run.output_dir.mkdir(parents=True)
    filtered.run.prepare_teacher_verdicts()
    assert [r["id"] for r in filtered.run.data.records] == [r["id"] for r in records if int(r["id"][-1]) % 2 == 0]
    assert filtered.run.info()["data"]["teacher_filtered_records"] == 4
    plain = Trainer(text_config(tmp_path / "p", f"data.train={kept}", *common))
    (a,), (b,) = run_steps(filtered, 1), run_steps(plain, 1)
    assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]


@pytest.mark.integration
def test_answerless_records_and_unknown_verifiers_are_one_line(tmp_path, capsys):
    from dopd_vl.cli import main

    records = _records(4)
    del records[1]["answer"]
    data = _write(tmp_path / "data.jsonl", records)
    from dopd_vl import load_tokenizer, make_adapter, preflight_records

    adapter = make_adapter(load_tokenizer())
    with pytest.raises(DatasetError, match=r"objective.trust: verified needs an `answer`.*arith-001"):
        Trainer(text_config(tmp_path / "a", f"data.train={data}", "objective.trust=verified", *SMALL))
    skip = text_config(tmp_path / "b", f"data.train={data}", "objective.name=uni_opd", "data.on_error=skip").data
    kept, skipped = preflight_records(skip, adapter, progress=False, answer_needed_by="objective uni_opd")
    assert [r["id"] for r in kept] == ["arith-000", "arith-002", "arith-003"]
    assert skipped[0]["id"] == "arith-001" and skipped[0]["kind"] == "answer_missing"
    for override in ("data.verifier=magic", "data.teacher_filter=verified"):
        capsys.readouterr()
        code = main(["train", "configs/tiny_text.yaml", f"data.train={data}", f"output_dir={tmp_path / 'c'}", override])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and "Traceback" not in "\n".join(err)
        assert err[-1].startswith("dopd train: error:")
        assert ("unknown verifier 'magic'" if "magic" in override else "arith-001") in err[-1]


@pytest.mark.integration
def test_verify_teacher_prints_the_accuracy_and_writes_the_verdicts(tmp_path, capsys):
    from dopd_vl.cli import main

    data = _write(tmp_path / "data.jsonl", _records(6))
    out = tmp_path / "verdicts.jsonl"
    recipe = ["configs/tiny_text.yaml", f"data.train={data}", "data.verifier=helpers.verifiers:even_ids"]
    assert main(["verify-teacher", *recipe, "rollout.max_new_tokens=4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "privileged teacher accuracy 0.500 over 6 records" in printed and str(out) in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["verdict"] for r in rows] == [True, False, True, False, True, False]
    # a run reads them instead of computing its own
    trainer = Trainer(
        text_config(
            tmp_path / "run", f"data.train={data}", f"data.teacher_verdicts={out}", "objective.trust=verified", *SMALL
        )
    )
    trainer.run.output_dir.mkdir(parents=True)
    trainer.run.prepare_teacher_verdicts()
    assert trainer.run.data.teacher_verdicts == {r["id"]: r["verdict"] for r in rows}
    assert not (trainer.run.output_dir / "teacher_verdicts.jsonl").exists()
