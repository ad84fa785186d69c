"""The reference loss over [B, T, V] logits (dopd_vl/loss/reference.py): hand-computed cases,
masking, normalisation, splits and every baseline against naive full-vocabulary computations."""

import math

import pytest
import torch

from dopd_vl.loss.reference import dopd_loss, objective_loss
from dopd_vl.method.objectives import ObjectiveConfig, build_objective
from dopd_vl.method.routing import Regime


# ---------------------------------------------------------------------------- hand-computed cases
def _probs_to_logits(rows):
    return torch.tensor(rows, dtype=torch.float64).log()


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def _cells(p, idx, tail=True):
    top = [p[i] for i in idx]
    return top + [1 - sum(top)] if tail else [x / sum(top) for x in top]


def test_dopd_loss_by_hand_on_a_four_word_vocabulary():
    # One sequence of 4 tokens, sampled token 0 each time; one token per regime (see test_routing).
    teacher = [[0.5, 0.2, 0.2, 0.1], [0.1, 0.3, 0.3, 0.3], [0.8, 0.1, 0.05, 0.05], [0.2, 0.5, 0.2, 0.1]]
    spriv = [[0.5, 0.3, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1], [0.2, 0.2, 0.3, 0.3], [0.8, 0.1, 0.05, 0.05]]
    student = [[0.4, 0.3, 0.2, 0.1], [0.3, 0.2, 0.4, 0.1], [0.3, 0.3, 0.2, 0.2], [0.6, 0.1, 0.1, 0.2]]
    cfg = ObjectiveConfig(top_k=2, outlier_fraction=0.0)
    out = dopd_loss(
        _probs_to_logits([student]),
        _probs_to_logits([teacher]),
        _probs_to_logits([spriv]),
        torch.zeros(1, 4, dtype=torch.long),
        torch.ones(1, 4, dtype=torch.bool),
        cfg,
    )
    assert out.regime.tolist() == [[Regime.LH, Regime.LL, Regime.HT, Regime.HS]]
    # Student top-2 indices (ties broken by torch.topk's order are avoided by the numbers chosen).
    top2 = [[0, 1], [2, 0], [0, 1], [0, 3]]
    lh = 0.6 * _kl(_cells(student[0], top2[0]), _cells(teacher[0], top2[0]))
    ll = 0.3 * _kl(_cells(student[1], top2[1]), _cells(spriv[1], top2[1]))
    m = [(a + b) / 2 for a, b in zip(teacher[2], student[2])]
    ht = 1.0 * (0.5 * _kl(teacher[2], m) + 0.5 * _kl(student[2], m))
    hs = 0.6 * _kl(_cells(student[3], top2[3]), _cells(spriv[3], top2[3]))
    expected = [lh, ll, ht, hs]
    assert out.token_loss[0].tolist() == pytest.approx(expected, rel=1e-9)
    assert out.loss.item() == pytest.approx(sum(expected) / 4, rel=1e-9)


# ---------------------------------------------------------------------------------- fixtures
B, T, V = 4, 9, 23


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(3)
    logits = {
        k: 3 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
        for k in ("student", "teacher_priv", "student_priv", "teacher_plain")
    }
    lengths = torch.tensor([9, 3, 6, 1])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    ids = torch.randint(0, V, (B, T), generator=g)
    return logits, ids, mask


def test_gradient_reaches_only_the_student(batch):
    logits, ids, mask = batch
    leaves = {k: v.clone().requires_grad_() for k, v in logits.items()}
    out = dopd_loss(
        leaves["student"], leaves["teacher_priv"], leaves["student_priv"], ids, mask, ObjectiveConfig(top_k=4)
    )
    out.loss.backward()
    assert leaves["student"].grad is not None and leaves["student"].grad.abs().sum() > 0
    assert leaves["teacher_priv"].grad is None and leaves["student_priv"].grad is None


def test_masked_positions_contribute_nothing_even_when_nan_or_inf(batch):
    logits, ids, mask = batch
    cfg = ObjectiveConfig(top_k=4)
    clean = dopd_loss(logits["student"], logits["teacher_priv"], logits["student_priv"], ids, mask, cfg)
    dirty = {k: v.clone() for k, v in logits.items()}
    for k, v in dirty.items():
        v[~mask] = float("nan") if k == "student" else float("inf")
        v[~mask, 0] = float("-inf")
    dirty_ids = torch.where(mask, ids, -100)
    s = dirty["student"].requires_grad_()
    out = dopd_loss(s, dirty["teacher_priv"], dirty["student_priv"], dirty_ids, mask, cfg)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(clean.loss.item(), rel=1e-12)
    assert torch.isfinite(s.grad).all() and (s.grad[~mask] == 0).all()
    assert (out.token_loss[~mask] == 0).all() and (out.regime[~mask] == -1).all()


@pytest.mark.parametrize("normalization", ["sequence", "token"])
def test_normalisation_follows_equation_1_6(batch, normalization):
    logits, ids, mask = batch
    out = dopd_loss(
        logits["student"],
        logits["teacher_priv"],
        logits["student_priv"],
        ids,
        mask,
        ObjectiveConfig(top_k=4, normalization=normalization),
    )
    tl = out.token_loss
    if normalization == "sequence":
        expected = sum(tl[b].sum() / mask[b].sum() for b in range(B)) / B
    else:
        expected = tl.sum() / mask.sum()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("normalization", ["sequence", "token"])
def test_batch_loss_is_weighted_combination_of_halves_with_whole_batch_thresholds(batch, normalization):
    logits, ids, mask = batch
    cfg = ObjectiveConfig(top_k=4, normalization=normalization)
    full = dopd_loss(logits["student"], logits["teacher_priv"], logits["student_priv"], ids, mask, cfg)
    parts = []
    for sl in (slice(0, 2), slice(2, 4)):
        part = dopd_loss(
            *(logits[k][sl] for k in ("student", "teacher_priv", "student_priv")),
            ids[sl],
            mask[sl],
            cfg,
            thresholds=full.thresholds,
        )
        assert torch.equal(part.regime, full.regime[sl])
        parts.append((part.loss, sl))
    if normalization == "sequence":
        combined = sum(loss * 2 for loss, _ in parts) / B
    else:
        combined = sum(loss * mask[sl].sum() for loss, sl in parts) / mask.sum()
    assert combined.item() == pytest.approx(full.loss.item(), rel=1e-12)
    # The same with step totals passed in: the shares simply add up.
    shares = [
        dopd_loss(
            *(logits[k][sl] for k in ("student", "teacher_priv", "student_priv")),
            ids[sl],
            mask[sl],
            cfg,
            thresholds=full.thresholds,
            num_sequences=B,
            num_tokens=int(mask.sum()),
        ).loss
        for sl in (slice(0, 2), slice(2, 4))
    ]
    assert sum(shares).item() == pytest.approx(full.loss.item(), rel=1e-12)


# ---------------------------------------------------------------------------------- baselines
def _naive_log_softmax(x):
    return (
        x
        - torch.log(torch.exp(x - x.max(-1, keepdim=True).values).sum(-1, keepdim=True))
        - x.max(-1, keepdim=True).values
    )


def _naive_seq_mean(per_token, mask):
    return sum(per_token[b][mask[b]].mean() for b in range(per_token.shape[0])) / per_token.shape[0]


def test_vanilla_opd_with_full_rkl_is_naive_rkl_to_the_plain_teacher(batch):
    logits, ids, mask = batch
    obj = build_objective(ObjectiveConfig(name="vanilla_opd", baseline_support="full"))
    assert obj.views == ("teacher_plain",)
    out = objective_loss(obj, logits["student"], {"teacher_plain": logits["teacher_plain"]}, ids, mask)
    s, t = _naive_log_softmax(logits["student"]), _naive_log_softmax(logits["teacher_plain"])
    rkl = (s.exp() * (s - t)).sum(-1)
    assert out.loss.item() == pytest.approx(_naive_seq_mean(rkl, mask).item(), rel=1e-10)


@pytest.mark.parametrize(
    "name,target,divergence",
    [
        ("privileged_opd", "teacher_priv", "rkl"),
        ("self_distill", "student_priv", "rkl"),
        ("uniform", "teacher_priv", "js"),
    ],
)
def test_single_route_baselines_use_their_target_on_every_token(batch, name, target, divergence):
    logits, ids, mask = batch
    obj = build_objective(ObjectiveConfig(name=name, baseline_support="full"))
    views = {v: logits[v] for v in obj.views}
    out = objective_loss(obj, logits["student"], views, ids, mask)
    s, t = _naive_log_softmax(logits["student"]), _naive_log_softmax(logits[target])
    if divergence == "rkl":
        d = (s.exp() * (s - t)).sum(-1)
    else:
        m = 0.5 * (s.exp() + t.exp())
        d = 0.5 * (t.exp() * (t - m.log())).sum(-1) + 0.5 * (s.exp() * (s - m.log())).sum(-1)
    assert out.loss.item() == pytest.approx(_naive_seq_mean(d, mask).item(), rel=1e-10)
    assert (out.route[mask] == 0).all()


@pytest.mark.parametrize("prune_by", ["largest_A", "smallest_A", "random"])
def test_pruned_opd_drops_20_percent_of_tokens_and_is_vanilla_elsewhere(batch, prune_by):
    logits, ids, mask = batch
    obj = build_objective(ObjectiveConfig(name="pruned_opd", prune_by=prune_by, baseline_support="full"))
    assert set(obj.views) == {"teacher_priv", "student_priv", "teacher_plain"}
    out = objective_loss(
        obj,
        logits["student"],
        {v: logits[v] for v in obj.views},
        ids,
        mask,
        prune_generator=torch.Generator().manual_seed(0),
    )
    n = int(mask.sum())
    dropped = (out.route == -1) & mask
    assert int(dropped.sum()) == int(0.2 * n)
    lt = _naive_log_softmax(logits["teacher_priv"]).gather(-1, ids[..., None]).squeeze(-1)
    ls = _naive_log_softmax(logits["student_priv"]).gather(-1, ids[..., None]).squeeze(-1)
    a = (lt - ls).abs()[mask]
    if prune_by != "random":
        kept_a, dropped_a = a[~dropped[mask]], a[dropped[mask]]
        if prune_by == "largest_A":
            assert dropped_a.min() >= kept_a.max()
        else:
            assert dropped_a.max() <= kept_a.min()
    s, t = _naive_log_softmax(logits["student"]), _naive_log_softmax(logits["teacher_plain"])
    rkl = (s.exp() * (s - t)).sum(-1)
    keep = mask & ~dropped
    expected = sum(rkl[b][keep[b]].sum() / mask[b].sum() for b in range(B)) / B
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-10)


def test_mismatched_vocabularies_are_a_clear_error(batch):
    logits, ids, mask = batch
    with pytest.raises(ValueError, match="different vocabulary sizes"):
        dopd_loss(logits["student"], logits["teacher_priv"][..., :-2], logits["student_priv"], ids, mask)
