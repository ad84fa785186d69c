"""The trust study (examples/toy_privilege/trust.py, readout.py): the first-step readout against an
independent computation, hand-checked label shares, and the study's pipeline at its smallest size."""

import json
import math
import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO))

from examples.toy_privilege import harness as toy  # noqa: E402
from examples.toy_privilege import readout, trust  # noqa: E402

pytestmark = pytest.mark.integration  # see pyproject.toml's markers

LH, LL, HT, HS = range(4)


def test_label_shares_hand_checked():
    """Six tokens: on-track HS tokens 0, 1, 2 (student right & teacher wrong on 0 and 2), an
    off-track HS token 3 (left out), HT tokens 4 (student wrong) and 5 (right)."""
    regime = torch.tensor([HS, HS, HS, HS, HT, HT])
    labels = {
        "on_track": torch.tensor([1, 1, 1, 0, 1, 1.0]),
        "student_right": torch.tensor([1, 1, 1, 0, 0, 1.0]),
        "teacher_right": torch.tensor([0, 1, 0, 0, 1, 1.0]),
        "response_right": torch.tensor([1, 1, 0, 0, 0, 0.0]),
    }
    shares = readout.label_shares(regime, labels)
    assert shares["hs_precision"] == pytest.approx(2 / 3) and shares["hs_on_track"] == 3
    assert shares["ht_student_wrong"] == pytest.approx(1 / 2) and shares["ht_on_track"] == 2
    assert shares["on_track"] == pytest.approx(5 / 6)
    assert shares["base_student_right_teacher_wrong"] == pytest.approx(2 / 5)
    assert shares["hs_share_correct"] == 1.0 and shares["hs_share_wrong"] == pytest.approx(2 / 4)
    assert shares["frac/HS"] == pytest.approx(4 / 6) and shares["frac/LH"] == 0.0


def _topk_rkl(s, t, k):
    """Top-K reverse KL with the tail cell, K from the student, written out."""
    index = s.detach().topk(k, dim=-1).indices
    in_top = torch.zeros_like(s, dtype=torch.bool).scatter(-1, index, True)
    cells_s = torch.cat([s.gather(-1, index), s.masked_fill(in_top, -math.inf).logsumexp(-1, keepdim=True)], -1)
    cells_t = torch.cat([t.gather(-1, index), t.masked_fill(in_top, -math.inf).logsumexp(-1, keepdim=True)], -1)
    return (cells_s.exp() * (cells_s - cells_t)).sum(-1)


def _js(s, t):
    m = torch.logaddexp(s, t) - math.log(2)
    return 0.5 * (t.exp() * (t - m)).sum(-1) + 0.5 * (s.exp() * (s - m)).sum(-1)


def independent_readout(run, micro_batches, student_path, teacher_path):
    """Labels, regimes and gradients from plain HF forwards, float64, every rule written out here."""
    from transformers import AutoModelForCausalLM

    from dopd_vl import build_views

    config, tokenizer = run.config.objective, run.tokenizer
    vocab = len(tokenizer)
    student = AutoModelForCausalLM.from_pretrained(student_path)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path).eval()
    records = [mb.records[i] for mb in micro_batches for i in mb.rollout.record_index]
    responses = [r for mb in micro_batches for r in mb.rollout.responses]
    views = build_views(
        run.data.adapters, ("student", "teacher_priv", "student_priv", "teacher_plain"), records, responses
    )

    def logp(model, view, grad=False):
        batch = views[view]
        with torch.set_grad_enabled(grad):
            logits = model(**batch.inputs).logits
        picked = logits.gather(1, batch.response_positions[..., None].expand(-1, -1, logits.shape[-1]))
        return picked[batch.response_mask][:, :vocab].double().log_softmax(-1)

    with torch.no_grad():
        t_priv, s_priv, t_plain = (
            logp(teacher, "teacher_priv"),
            logp(student, "student_priv"),
            logp(teacher, "teacher_plain"),
        )
    ids = torch.cat(responses)
    q_t, q_s = t_priv.gather(-1, ids[:, None]).squeeze(-1).exp(), s_priv.gather(-1, ids[:, None]).squeeze(-1).exp()
    a = (q_t.log() - q_s.log()).abs()

    def trimmed(v):
        return v.sort().values[: len(v) - math.floor(config.outlier_fraction * len(v))].mean()

    high, confident = a >= trimmed(a), (q_t + q_s) >= trimmed(q_t) + trimmed(q_s)
    regime = torch.tensor(
        [(HT if qt >= qs else HS) if h else (LH if c else LL) for h, c, qt, qs in zip(high, confident, q_t, q_s)]
    )
    on, right, teacher_right = [], [], []
    argmax = t_priv.argmax(-1).tolist()
    position = 0
    for record, response in zip(records, responses):
        reference = tokenizer(record["meta"]["solution"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        for t, token in enumerate(response.tolist()):
            tracked = t < len(reference) and response.tolist()[:t] == reference[:t]
            on.append(tracked)
            right.append(tracked and token == reference[t])
            teacher_right.append(tracked and argmax[position] == reference[t])
            position += 1
    on, right, teacher_right = map(torch.tensor, (on, right, teacher_right))
    hs = on & (regime == HS)

    s = logp(student, "student", grad=True)
    lengths = torch.tensor([r.numel() for r in responses])
    weight = torch.repeat_interleave(1.0 / (len(responses) * lengths.double()), lengths)  # mean of sequence means
    k = config.top_k
    per_token = {
        LH: config.beta_light * _topk_rkl(s, t_priv, k),
        LL: config.beta_weak * _topk_rkl(s, s_priv, k),
        HT: _js(s, t_priv),
        HS: config.beta_light * _topk_rkl(s, s_priv, k),
    }
    params = list(student.parameters())

    def grad(loss):
        return torch.cat([g.flatten().double() for g in torch.autograd.grad(loss, params, retain_graph=True)])

    grads = {
        name: grad((weight * per_token[code] * (regime == code)).sum()) for code, name in enumerate(readout.REGIMES)
    }
    grads["vanilla"] = grad((weight * _topk_rkl(s, t_plain, k)).sum())
    full_rkl = (s.exp() * (s - t_priv)).sum(-1)
    grads["HT_rkl"] = grad((weight * full_rkl * (regime == HT)).sum())
    return {
        "regime": regime,
        "hs_precision": float((right & ~teacher_right)[hs].double().mean()) if hs.any() else None,
        "hs_on_track": int(hs.sum()),
        "on_track": float(on.double().mean()),
        "grads": grads,
    }


def test_readout_equals_an_independent_computation(tmp_path):
    """On a tiny fixed case (smoke-size two_step, the student warmed up enough to be right on some
    tokens): the readout's regime shares, HS precision, gradient norms, cosines with vanilla OPD's
    gradient and |∇JS| / |∇RKL| on HT equal the independent float64 computation."""
    size = toy.TASKS["two_step"].sizes["smoke"]
    train, _ = toy.write_data(tmp_path, "two_step", size, 0)
    teacher = toy.train_model(tmp_path / "teacher", "teacher", "two_step", train, 0, 30, "cpu")
    student = toy.train_model(tmp_path / "student", "student", "two_step", train, 0, 120, "cpu")
    prepared = toy.Prepared(train, train, teacher, student, {})
    task = toy.TASKS["two_step"]
    result = readout.readout(tmp_path / "readout", 0, prepared, task, "cpu")
    run, micro_batches, _ = readout.first_step(tmp_path / "again", "dopd", 0, prepared, task, "cpu")
    ref = independent_readout(run, micro_batches, student, teacher)

    for code, name in enumerate(readout.REGIMES):
        assert result[f"frac/{name}"] == pytest.approx(float((ref["regime"] == code).double().mean()), abs=1e-12)
    assert result["on_track"] == pytest.approx(ref["on_track"], abs=1e-12) and result["on_track"] > 0
    assert result["hs_on_track"] == ref["hs_on_track"] > 0
    assert result["hs_precision"] == pytest.approx(ref["hs_precision"], abs=1e-12)
    grads = ref["grads"]
    for name in ("vanilla", *readout.REGIMES, "HT_rkl"):
        assert result["grad_norm"][name] == pytest.approx(float(grads[name].norm()), rel=1e-4), name
    for name in readout.REGIMES:
        expected = float(grads[name] @ grads["vanilla"] / (grads[name].norm() * grads["vanilla"].norm()))
        assert result["cosine_with_vanilla"][name] == pytest.approx(expected, abs=1e-4), name
    dopd = sum(grads[n] for n in readout.REGIMES)
    assert result["cosine_with_vanilla"]["dopd"] == pytest.approx(
        float(dopd @ grads["vanilla"] / (dopd.norm() * grads["vanilla"].norm())), abs=1e-4
    )
    assert result["ht_js_over_rkl"] == pytest.approx(float(grads["HT"].norm() / grads["HT_rkl"].norm()), rel=1e-4)
    assert result["regime_sum_error"] < 1e-5


def test_trust_study_pipeline_smoke(tmp_path):
    """`--study trust` at its smallest size, one method (vanilla OPD, the one every table compares
    with) at one learning rate: both teachers, the dev selection, the readout, the tables, the figure and the
    measured cells."""
    size = toy.TASKS["two_step"].sizes["smoke"]
    methods = (trust.METHODS[0],)
    payload = trust.run_study(tmp_path / "two_step", "two_step", size, "cpu", methods=methods, learning_rates=(3e-4,))
    selection = json.loads((tmp_path / "two_step" / "selection.json").read_text())
    assert set(selection["chosen"]) == set(trust.TEACHERS) and set(selection["chosen"]["blind"]) == {"vanilla_opd"}
    for teacher, per_label in selection["dev_accuracy"].items():
        for label, per_lr in per_label.items():
            assert list(per_lr) == ["0.0003"], (teacher, label)  # choose_lr's choice: its own test
            best = max(per_lr.values())
            assert per_lr[f"{selection['chosen'][teacher][label]:g}"] == best, (teacher, label)
    text = (tmp_path / "two_step" / "results.md").read_text()
    for row in (
        "| blind teacher, with context |",
        "| blind | vanilla_opd |",
        "**HS precision**",
        "| clean | vanilla_opd |",
    ):
        assert row in text
    study = json.loads((tmp_path / "trust_study.json").read_text())
    assert study == trust.study_summary(payload)
    assert [c["teacher"] for c in study["cells"]] == ["clean", "blind"]
    assert (tmp_path / "two_step" / "trust.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the blind-spot teacher was trained on the dropped carry: its targets differ from the clean one's
    records = [json.loads(line) for line in (tmp_path / "two_step" / "seed0" / "data" / "train.jsonl").open()]
    assert any(r["meta"]["blind_solution"] != r["meta"]["solution"] for r in records)


def test_choose_lr_takes_the_best_dev_accuracy_and_breaks_ties_by_run_order():
    dev = {lr: {"dev": {"accuracy": a}} for lr, a in zip(trust.LEARNING_RATES, (0.5, 0.7, 0.7))}
    assert trust.choose_lr(dev) == trust.LEARNING_RATES[1]
    assert trust.choose_lr({lr: {"dev": {"accuracy": 0.4}} for lr in trust.LEARNING_RATES}) == trust.LEARNING_RATES[0]
    assert trust.choose_lr({1e-2: {"dev": {"accuracy": 0.7}}, 5e-5: {"dev": {"accuracy": 0.7}}}) == 1e-2  # any rates
