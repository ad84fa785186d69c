"""Verdicts in the token plan (docs/design.md §1.12, §1.10): `trust: verified` and `uni_opd`, each
against a float64 computation written out here, independent of dopd_vl's divergences and routing,
on hand-checked cases; Uni-OPD's balancing, margin and clipped surrogate on hand-made numbers."""

import math

import pytest
import torch

from dopd_vl.loss.reference import objective_loss
from dopd_vl.method.divergences import clipped_policy_loss
from dopd_vl.method.objectives import ObjectiveConfig, build_objective
from dopd_vl.method.outcomes import Outcomes, balance_rollouts, margin_shifts

V = 5
LH, LL, HT, HS = range(4)


def _probs(row):
    z = [math.exp(x) for x in row]
    return [x / sum(z) for x in z]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def _js(s, t):
    m = [0.5 * a + 0.5 * b for a, b in zip(s, t)]
    return 0.5 * _kl(t, m) + 0.5 * _kl(s, m)


def _case(seed: int, lengths: list[int]):
    g = torch.Generator().manual_seed(seed)
    b, t = len(lengths), max(lengths)
    logits = {
        k: 2.0 * torch.randn(b, t, V, generator=g, dtype=torch.float64)
        for k in ("student", "teacher_priv", "student_priv")
    }
    ids = torch.randint(0, V, (b, t), generator=g)
    mask = torch.tensor([[i < n for i in range(t)] for n in lengths])
    return logits, ids, mask


def _paper_regimes(logits, ids, mask):
    """Table 1.4 by hand: thresholds are plain means (outlier_fraction 0)."""
    toks = [(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]
    lt = {bt: math.log(_probs(logits["teacher_priv"][bt].tolist())[ids[bt]]) for bt in toks}
    ls = {bt: math.log(_probs(logits["student_priv"][bt].tolist())[ids[bt]]) for bt in toks}
    a = {bt: abs(lt[bt] - ls[bt]) for bt in toks}
    ta = sum(a.values()) / len(toks)
    tq = sum(math.exp(v) for v in lt.values()) / len(toks) + sum(math.exp(v) for v in ls.values()) / len(toks)
    regimes = {}
    for bt in toks:
        qt, qs = math.exp(lt[bt]), math.exp(ls[bt])
        if a[bt] >= ta:
            regimes[bt] = HT if qt >= qs else HS
        else:
            regimes[bt] = LH if qt + qs >= tq else LL
    return toks, regimes


def _dopd_token_loss(logits, bt, route):
    s = _probs(logits["student"][bt].tolist())
    t = _probs(logits["teacher_priv"][bt].tolist())
    p = _probs(logits["student_priv"][bt].tolist())
    return {LH: 0.6 * _kl(s, t), LL: 0.3 * _kl(s, p), HT: _js(s, t), HS: 0.6 * _kl(s, p)}[route]


def test_trust_verified_routes_by_the_verdicts_against_a_float64_reference():
    """Three responses: r0's record has a wrong teacher (every token to HS); r1's teacher is right
    and r1 is wrong (its LL / HS tokens to LH); r2 is right (the paper's rule). K = V, so the top-K
    routes are the full-vocabulary KLs."""
    logits, ids, mask = _case(5, [4, 4, 3])
    toks, paper = _paper_regimes(logits, ids, mask)
    teacher = torch.tensor([0, 1, 1])
    response = torch.tensor([0, 0, 1])
    expected_route = {}
    for b, t in toks:
        r = paper[(b, t)]
        if teacher[b] == 0:
            r = HS
        elif response[b] == 0 and r in (LL, HS):
            r = LH
        expected_route[(b, t)] = r
    moved = [bt for bt in toks if expected_route[bt] != paper[bt]]
    assert {expected_route[bt] for bt in toks if bt[0] == 0} == {HS}
    assert any(paper[bt] in (LL, HS) for bt in toks if bt[0] == 1)  # the case exercises the second override
    assert moved  # and the first
    lengths = mask.sum(-1)
    expected = sum(
        _dopd_token_loss(logits, bt, expected_route[bt]) / (int(lengths[bt[0]]) * mask.shape[0]) for bt in toks
    )
    config = ObjectiveConfig(name="dopd", trust="verified", top_k=V, outlier_fraction=0.0)
    objective = build_objective(config)
    student = logits["student"].clone().requires_grad_()
    out = objective_loss(
        objective,
        student,
        {v: logits[v] for v in objective.views},
        ids,
        mask,
        outcomes=Outcomes(response=response, teacher=teacher),
    )
    assert out.loss.item() == pytest.approx(expected, rel=1e-9)
    assert {bt: int(out.route[bt]) for bt in toks} == expected_route
    assert {bt: int(out.regime[bt]) for bt in toks} == paper  # regimes stay the paper's rule's
    # without verdicts (none for every record) the paper's rule stands
    none = Outcomes(response=torch.full((3,), -1), teacher=torch.full((3,), -1))
    plain = objective_loss(
        objective, logits["student"], {v: logits[v] for v in objective.views}, ids, mask, outcomes=none
    )
    paper_loss = sum(_dopd_token_loss(logits, bt, paper[bt]) / (int(lengths[bt[0]]) * 3) for bt in toks)
    assert plain.loss.item() == pytest.approx(paper_loss, rel=1e-9)


def test_balancing_drops_the_excess_side_of_each_group():
    # group 0: 3 correct 1 wrong | group 1: 1 correct 3 (wrong, none, wrong) | group 2: all right | 3: all wrong
    verdicts = torch.tensor([1, 1, 1, 0, 1, 0, -1, 0, 1, 1, 0, 0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3])
    keep = balance_rollouts(verdicts, groups, ratio=1.0, seed=3)
    assert keep[:4].tolist().count(True) == 2 and bool(keep[3])  # one correct and the wrong one
    assert keep[4:8].tolist().count(True) == 2 and bool(keep[4])  # the correct one and one of the others
    assert keep[8:].all()
    assert torch.equal(keep, balance_rollouts(verdicts, groups, 1.0, seed=3))  # seeded
    # ratio 2: group 0 keeps floor(2*1) = 2 correct; group 1 keeps floor(1/2) = 0 -> no drop (needs >= 1)
    keep2 = balance_rollouts(verdicts, groups, ratio=2.0, seed=0)
    assert keep2[:4].tolist().count(True) == 3 and keep2[4:8].all()


def test_margin_shift_by_hand():
    means = torch.tensor([0.1, -0.1, 0.5, 0.0, -0.2, 0.3], dtype=torch.float64)
    verdicts = torch.tensor([1, 0, 1, 0, 0, 1])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    keep = torch.tensor([True, True, True, True, True, False])
    # group 0: g = 0.2 < 0.4 -> s = 0.2, +-0.1; group 1: g = 0.5 >= 0.4 -> none (widen); group 2: one class kept -> none
    shift = margin_shifts(means, verdicts, groups, keep, 0.4, "split", "widen")
    assert shift.tolist() == pytest.approx([0.1, -0.1, 0, 0, 0, 0])
    exact = margin_shifts(means, verdicts, groups, keep, 0.4, "split", "exact")
    assert exact.tolist() == pytest.approx([0.1, -0.1, -0.05, 0.05, 0, 0])
    assert margin_shifts(means, verdicts, groups, keep, 0.4, "correct", "widen").tolist() == pytest.approx(
        [0.2, 0, 0, 0, 0, 0]
    )
    assert margin_shifts(means, verdicts, groups, keep, 0.4, "incorrect", "widen").tolist() == pytest.approx(
        [0, -0.2, 0, 0, 0, 0]
    )


def test_clipped_surrogate_where_the_ratio_is_not_one():
    logp = torch.tensor([math.log(0.5)] * 4, dtype=torch.float64, requires_grad=True)
    old = torch.tensor([math.log(0.25), math.log(0.25), math.log(0.5), math.log(1.0)], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 2.0, -1.0], dtype=torch.float64)
    loss = clipped_policy_loss(logp, old, adv, 0.2, 0.28)
    # ratios 2, 2, 1, 0.5: A=+1 clipped at 1.28 (no gradient); A=-1 unclipped -2 (gradient -A*ratio = 2);
    # ratio 1: -A, gradient -A; ratio 0.5 with A=-1: min(-0.5, -0.8) = -0.8 clipped (no gradient)
    assert loss.tolist() == pytest.approx([-1.28, 2.0, -2.0, 0.8])
    loss.sum().backward()
    assert logp.grad.tolist() == pytest.approx([0.0, 2.0, -2.0, 0.0])


def test_uni_opd_loss_and_gradient_against_a_float64_reference():
    """Two prompts x 3 rollouts. Prompt 0: 2 correct + 1 wrong -> one correct rollout dropped, the
    margin computed on the kept pair; prompt 1: all wrong -> kept, no margin. One token of rollout 5
    is pushed past the log-prob mask."""
    logits, ids, mask = _case(9, [3, 2, 3, 3, 2, 3])
    logits["teacher_priv"][5, 1] = -40.0
    logits["teacher_priv"][5, 1, ids[5, 1]] = -40.0 + 0.0  # every entry equal: no mask yet
    logits["teacher_priv"][5, 1, (ids[5, 1] + 1) % V] = 0.0  # the sampled token far below the rest: |r| > 10
    verdicts = torch.tensor([1, 1, 0, 0, 0, -1])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    config = ObjectiveConfig(name="uni_opd")
    objective = build_objective(config)
    student = logits["student"].clone().requires_grad_()
    out = objective_loss(
        objective,
        student,
        {"teacher_priv": logits["teacher_priv"]},
        ids,
        mask,
        groups=groups,
        outcomes=Outcomes(response=verdicts, teacher=torch.full((6,), -1), seed=1),
    )
    out.loss.backward()
    dropped = [b for b in range(6) if all(int(out.route[b, t]) == -1 for t in range(int(mask[b].sum())))]
    assert len(dropped) == 1 and dropped[0] in (0, 1)
    kept_correct = 1 - dropped[0]
    toks = [(b, t) for b in range(6) for t in range(3) if mask[b, t]]
    s = {bt: _probs(logits["student"][bt].tolist()) for bt in toks}
    reward = {
        bt: math.log(_probs(logits["teacher_priv"][bt].tolist())[ids[bt]]) - math.log(s[bt][ids[bt]]) for bt in toks
    }
    masked = {bt for bt in toks if abs(reward[bt]) >= 10}
    assert masked == {(5, 1)}

    def mean_reward(b):
        own = [reward[bt] for bt in toks if bt[0] == b and bt not in masked]
        return sum(own) / len(own)

    gap = mean_reward(kept_correct) - mean_reward(2)
    s_shift = max(0.4 - gap, 0.0)
    shift = {kept_correct: s_shift / 2, 2: -s_shift / 2}
    expected_loss, expected_grad = 0.0, torch.zeros(6, 3, V, dtype=torch.float64)
    for b, t in toks:
        if b == dropped[0] or (b, t) in masked:
            continue
        advantage = reward[(b, t)] + shift.get(b, 0.0)
        w = 1.0 / (int(mask[b].sum()) * 6)  # per-sample token mean over all 6 rollouts
        expected_loss += -advantage * w
        onehot = [1.0 if v == ids[b, t] else 0.0 for v in range(V)]
        expected_grad[b, t] = torch.tensor(
            [-advantage * w * (o - p) for o, p in zip(onehot, s[(b, t)])], dtype=torch.float64
        )
    assert out.loss.item() == pytest.approx(expected_loss, rel=1e-9)
    got = student.grad.nan_to_num(0.0) * mask[..., None]
    assert torch.allclose(got, expected_grad, rtol=1e-9, atol=1e-12)
