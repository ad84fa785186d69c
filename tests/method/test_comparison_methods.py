"""The paper's comparison methods (EOPD, ExOPD, VA-OPD, Vision-OPD; Uni-OPD: test_verified.py) pinned
against computations written out here in float64, independent of dopd_vl's divergences (docs/design.md §1.10)."""

import math

import pytest
import torch

from dopd_vl.loss.reference import objective_loss
from dopd_vl.method.objectives import ObjectiveConfig, build_objective
from dopd_vl.method.plan import rollout_weights

from conftest import REPO

V = 5


def _logp(rows):
    return torch.tensor(rows, dtype=torch.float64).log_softmax(-1)


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def _entropy(p):
    return -sum(a * math.log(a) for a in p if a > 0)


def _probs(logits_row):
    z = [math.exp(x) for x in logits_row]
    return [x / sum(z) for x in z]


@pytest.fixture
def case():
    """Two responses of 3 tokens (the second has 2 valid tokens) over a 5-word vocabulary."""
    g = torch.Generator().manual_seed(11)
    logits = {
        k: 2.0 * torch.randn(2, 3, V, generator=g, dtype=torch.float64)
        for k in ("student", "teacher_priv", "teacher_plain", "reference", "student_priv")
    }
    ids = torch.randint(0, V, (2, 3), generator=g)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    logits["student"][1, 2] = float("nan")  # a masked slot may hold anything
    return logits, ids, mask


def _tokens(mask):
    return [(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]


def _run(config, case, **kw):
    logits, ids, mask = case
    student = logits["student"].clone().requires_grad_()
    obj = build_objective(config)
    out = objective_loss(obj, student, {v: logits[v] for v in obj.views}, ids, mask, **kw)
    out.loss.backward()
    return out, student.grad


# ----------------------------------------------------------------------------------------- EOPD
@pytest.mark.parametrize("threshold", ["trimmed_mean", "quantile"])
def test_eopd_adds_forward_kl_where_the_teachers_entropy_is_high(case, threshold):
    logits, ids, mask = case
    config = ObjectiveConfig(
        name="eopd", outlier_fraction=0.0, split_threshold=threshold, split_quantile=0.5, fkl_weight=0.7
    )
    out, _ = _run(config, case)
    toks = _tokens(mask)
    s = {bt: _probs(logits["student"][bt].tolist()) for bt in toks}
    t = {bt: _probs(logits["teacher_priv"][bt].tolist()) for bt in toks}
    ent = sorted(_entropy(t[bt]) for bt in toks)
    if threshold == "trimmed_mean":
        cut = sum(ent) / len(ent)
    else:  # the median of 5 values
        cut = ent[2]
    expected = {}
    for bt in toks:
        loss = _kl(s[bt], t[bt])
        if _entropy(t[bt]) >= cut:
            loss += 0.7 * _kl(t[bt], s[bt])
        expected[bt] = loss
    high = [bt for bt in toks if _entropy(t[bt]) >= cut]
    assert 0 < len(high) < len(toks)  # both branches are exercised
    assert out.route[mask].tolist() == [int(bt in high) for bt in toks]
    assert out.thresholds["teacher_entropy"] == pytest.approx(cut, rel=1e-12)
    for bt in toks:
        assert out.token_loss[bt].item() == pytest.approx(expected[bt], rel=1e-9)
    # sequence normalisation: mean over the 2 sequences of their token means
    total = (sum(expected[(0, t)] for t in range(3)) / 3 + sum(expected[(1, t)] for t in range(2)) / 2) / 2
    assert out.loss.item() == pytest.approx(total, rel=1e-9)


def test_eopd_follows_the_configured_teacher_view(case):
    logits, ids, mask = case
    plain = build_objective(ObjectiveConfig(name="eopd", teacher_view="teacher_plain"))
    assert plain.views == ("teacher_plain",) and all(r.target == "teacher_plain" for r in plain.routes)
    no_fkl = build_objective(ObjectiveConfig(name="eopd", fkl_weight=0.0))
    assert no_fkl.routes[1].terms == (("rkl", 1.0),)


# ---------------------------------------------------------------------------------------- ExOPD
@pytest.mark.parametrize("lam", [1.0, 1.5])
def test_exopd_is_the_sampled_reverse_kl_to_the_extrapolated_target(case, lam):
    logits, ids, mask = case
    out, grad = _run(ObjectiveConfig(name="exopd", exopd_lambda=lam), case)
    toks = _tokens(mask)
    n_seq, lengths = 2, [3, 2]
    expected_grad = torch.zeros(2, 3, V, dtype=torch.float64)
    for b, t in toks:
        y = int(ids[b, t])
        ls, lt, lr = (math.log(_probs(logits[v][b, t].tolist())[y]) for v in ("student", "teacher_priv", "reference"))
        # reward r = lam*(lT - lref) - (lS - lref); loss = -sg(r) * lS
        reward = lam * (lt - lr) - (ls - lr)
        assert out.token_loss[b, t].item() == pytest.approx(-reward * ls, rel=1e-9)
        w = 1.0 / (lengths[b] * n_seq)
        p = _probs(logits["student"][b, t].tolist())
        for v in range(V):  # d lS / d logit_v = [v == y] - p_v
            expected_grad[b, t, v] = -reward * w * ((v == y) - p[v])
    assert torch.allclose(grad[mask], expected_grad[mask], rtol=1e-9, atol=1e-12)
    assert (grad[~mask] == 0).all()


def test_exopd_with_lambda_one_and_the_plain_teacher_is_vanilla_opd(case):
    exopd, g1 = _run(ObjectiveConfig(name="exopd", exopd_lambda=1.0, teacher_view="teacher_plain"), case)
    vanilla, g2 = _run(ObjectiveConfig(name="vanilla_opd", baseline_support="sampled"), case)
    assert exopd.loss.item() == pytest.approx(vanilla.loss.item(), rel=1e-12)
    assert torch.allclose(g1, g2)


# --------------------------------------------------------------------------------------- VA-OPD
@pytest.mark.parametrize("temperature", [None, 0.5])
def test_va_opd_averages_each_visual_advantage_group_and_weights_rollouts(case, temperature):
    logits, ids, mask = case
    groups = torch.tensor([0, 0])  # two rollouts of one prompt
    config = ObjectiveConfig(
        name="va_opd",
        outlier_fraction=0.0,
        baseline_support="full",
        va_high_weight=0.8,
        va_low_weight=0.3,
        va_temperature=temperature,
    )
    out, _ = _run(config, case, groups=groups)
    toks = _tokens(mask)
    lp = {
        v: {bt: math.log(_probs(logits[v][bt].tolist())[int(ids[bt])]) for bt in toks}
        for v in ("teacher_priv", "teacher_plain")
    }
    va = {bt: lp["teacher_priv"][bt] - lp["teacher_plain"][bt] for bt in toks}
    cut = sum(va.values()) / len(va)
    high = {bt for bt in toks if va[bt] >= cut}
    assert 0 < len(high) < len(toks)
    n_high, n_low = len(high), len(toks) - len(high)
    mean_va = [sum(va[(b, t)] for t in range(3) if mask[b, t]) / int(mask[b].sum()) for b in range(2)]
    if temperature is None:
        rho = [1.0, 1.0]
    else:
        z = [math.exp(m / temperature) for m in mean_va]
        rho = [2 * x / sum(z) for x in z]
    total = 0.0
    for bt in toks:
        s, t = _probs(logits["student"][bt].tolist()), _probs(logits["teacher_priv"][bt].tolist())
        weight, count = (0.8, n_high) if bt in high else (0.3, n_low)
        assert out.token_loss[bt].item() == pytest.approx(weight * _kl(s, t), rel=1e-9)
        total += weight * _kl(s, t) * rho[bt[0]] / count
    assert out.loss.item() == pytest.approx(total, rel=1e-9)
    assert out.thresholds["count/route1"] == n_high and out.thresholds["count/route0"] == n_low


def test_va_opd_rollout_weights_are_per_prompt_group():
    obj = build_objective(ObjectiveConfig(name="va_opd", va_temperature=1.0))
    mask = torch.ones(4, 2, dtype=torch.bool)
    va = torch.tensor([[1.0, 1.0], [0.0, 0.0], [5.0, 5.0], [5.0, 5.0]], dtype=torch.float64)
    from dopd_vl.method.routing import TokenSignals

    w = rollout_weights(obj, mask.sum(-1), TokenSignals(visual_advantage=va[mask]), torch.tensor([0, 0, 1, 1]))
    e = math.e
    assert w.tolist() == pytest.approx([2 * e / (e + 1), 2 / (e + 1), 1.0, 1.0])
    ragged = torch.tensor([[True, True], [True, False], [True, True], [True, True]])
    # [N] over the valid tokens, as the plan passes them: a shorter response's mean is over its own tokens
    short = rollout_weights(obj, ragged.sum(-1), TokenSignals(visual_advantage=va[ragged]), torch.tensor([0, 0, 1, 1]))
    assert torch.allclose(w, short)


# ----------------------------------------------------------------------------------- Vision-OPD
def test_vision_opd_distills_from_the_privileged_self(case):
    vision, g1 = _run(ObjectiveConfig(name="vision_opd", top_k=3), case)
    self_distill, g2 = _run(ObjectiveConfig(name="self_distill", top_k=3), case)
    assert build_objective(ObjectiveConfig(name="vision_opd")).views == ("student_priv",)
    assert vision.loss.item() == pytest.approx(self_distill.loss.item(), rel=1e-12) and torch.allclose(g1, g2)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="teacher_view"):
        ObjectiveConfig(name="eopd", teacher_view="student_priv")
    with pytest.raises(ValueError, match="split_threshold"):
        ObjectiveConfig(name="eopd", split_threshold="median")
    with pytest.raises(ValueError, match="va_temperature"):
        ObjectiveConfig(name="va_opd", va_temperature=0.0)


# ------------------------------------------------------------------------- recipes, tiny models
TINY = {
    "text": [
        "student.name_or_path=tiny:qwen3",
        "teacher.name_or_path=tiny:qwen3:hidden_size=96,num_layers=3,num_heads=6,intermediate_size=192,seed=1",
        f"data.train={REPO / 'configs' / 'data' / 'arith' / 'data.jsonl'}",
    ],
    "vision": [
        "student.name_or_path=tiny:qwen3-vl",
        "teacher.name_or_path=tiny:qwen3-vl:hidden_size=96,num_layers=3,num_heads=6,intermediate_size=192,seed=1",
        f"data.train={REPO / 'configs' / 'data' / 'shapes' / 'data.jsonl'}",
    ],
}
SMALL = [
    "student.dtype=float32",
    "teacher.dtype=float32",
    "max_steps=2",
    "save_steps=2",
    "gradient_checkpointing=false",
    "rollout.max_new_tokens=4",
    "rollout.num_generations=2",
    "optim.batch_size=2",
    "optim.gradient_accumulation_steps=1",
    "objective.top_k=16",
]


@pytest.mark.parametrize(
    "name, modality, extra, metric",
    [
        ("eopd", "text", [], "frac/high_teacher_entropy"),
        ("exopd", "text", [], "loss"),
        ("exopd", "text", ["lora.enabled=true", "lora.r=4"], "loss"),  # the reference is the base model (adapter off)
        ("va_opd", "vision", [], "frac/high_visual_advantage"),
        ("uni_opd", "text", [], "uni_opd/dropped"),
    ],
    ids=["eopd", "exopd", "exopd-lora", "va_opd", "uni_opd"],
)
@pytest.mark.integration
def test_each_comparison_recipe_trains_on_the_tiny_models(tmp_path, name, modality, extra, metric):
    import json

    from dopd_vl.cli import main

    run = tmp_path / name
    assert (
        main(
            [
                "train",
                str(REPO / "configs" / "baselines" / f"{name}.yaml"),
                *TINY[modality],
                f"output_dir={run}",
                *SMALL,
                *extra,
            ]
        )
        == 0
    )
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert math.isfinite(m["loss"]) and math.isfinite(m[metric]) and m["grad_norm"] > 0
    if metric.startswith("frac/high"):
        assert all(0 < m[metric] < 1 for m in metrics)
    assert (run / "final" / "model.safetensors").exists()


@pytest.mark.integration
def test_exopd_reference_is_the_frozen_initial_student(tmp_path):
    from dopd_vl.training.config import load_config
    from dopd_vl.training.trainer import Trainer

    recipe = REPO / "configs" / "baselines" / "exopd.yaml"
    trainer = Trainer(load_config(recipe, [*TINY["text"], f"output_dir={tmp_path / 'a'}", *SMALL, "optim.lr=1e-2"]))
    start = {k: v.clone() for k, v in trainer.run.models.student.state_dict().items()}
    trainer.train()
    assert all(torch.equal(start[k], v) for k, v in trainer.run.models.reference.state_dict().items())
    assert any(not torch.equal(start[k], v) for k, v in trainer.run.models.student.state_dict().items())
    shared = Trainer(
        load_config(
            recipe, [*TINY["text"], f"output_dir={tmp_path / 'b'}", *SMALL, "objective.privileged_student=initial"]
        )
    )
    assert shared.run.models.reference is shared.run.models.privileged_student is not None  # one frozen copy, not two
