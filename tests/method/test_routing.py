"""Trimmed means, signals and regimes, including every boundary of table 1.4."""

import math

import pytest
import torch

from dopd_vl.method.plan import route_tokens
from dopd_vl.method.routing import Regime, trimmed_mean


@pytest.mark.parametrize("n", [19, 20, 21, 1000])
def test_trimmed_mean_drops_exactly_floor_5_percent_largest(n):
    g = torch.Generator().manual_seed(n)
    values = torch.randn(n, generator=g, dtype=torch.float64)
    dropped = math.floor(0.05 * n)
    kept = sorted(values.tolist())[: n - dropped]
    assert trimmed_mean(values).item() == pytest.approx(sum(kept) / len(kept), rel=1e-12)


def test_trimmed_mean_rejects_bad_input():
    with pytest.raises(ValueError, match="1-D"):
        trimmed_mean(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="empty"):
        trimmed_mean(torch.zeros(0))


def test_regime_codes_are_public_api():
    assert [Regime.LH, Regime.LL, Regime.HT, Regime.HS] == [0, 1, 2, 3]


def test_one_token_per_regime_by_hand():
    # q_T, q_S per token: LH (0.5, 0.5), LL (0.1, 0.1), HT (0.8, 0.2), HS (0.2, 0.8).
    # A = 0, 0, ln 4, ln 4 -> mean ln 2; q means 0.4 + 0.4 = 0.8; sums 1.0, 0.2 -> LH, LL.
    q_t = torch.tensor([[0.5, 0.1, 0.8, 0.2]])
    q_s = torch.tensor([[0.5, 0.1, 0.2, 0.8]])
    r = route_tokens(q_t.log(), q_s.log(), torch.ones(1, 4, dtype=torch.bool), outlier_fraction=0.0)
    assert r.regime.tolist() == [[Regime.LH, Regime.LL, Regime.HT, Regime.HS]]
    assert r.thresholds["A"] == pytest.approx(math.log(2), rel=1e-6)
    assert r.thresholds["q_teacher"] == pytest.approx(0.4, rel=1e-6)
    assert r.advantage_gap[0, 2].item() == pytest.approx(math.log(4), rel=1e-6)


def test_gap_equal_to_threshold_is_high_and_equal_confidence_is_teacher():
    # Identical teacher and student: A = 0 = threshold (high), q_T == q_S (HT).
    lp = torch.tensor([[-0.3, -1.2], [-2.0, -0.7]])
    r = route_tokens(lp, lp.clone(), torch.ones(2, 2, dtype=torch.bool))
    assert (r.regime == Regime.HT).all()
    # Two tokens with the same nonzero gap: the mean equals it exactly, both are high.
    l_t = torch.tensor([[-0.5, -2.5]])
    l_s = torch.tensor([[-1.5, -1.5]])
    r = route_tokens(l_t, l_s, torch.ones(1, 2, dtype=torch.bool), outlier_fraction=0.0)
    assert r.regime.tolist() == [[Regime.HT, Regime.HS]]


def test_explicit_boundaries_with_given_thresholds():
    l_t = torch.tensor([[-0.4, -0.9, -0.2]])
    l_s = torch.tensor([[-0.9, -0.4, -0.2]])
    a = (l_t.double() - l_s.double()).abs()
    # Token 0: A == threshold -> high, q_T > q_S -> HT. Token 1: A == threshold, q_T < q_S -> HS.
    thresholds = {"A": a[0, 0].item(), "q_student": 0.0, "q_teacher": 0.0}
    r = route_tokens(l_t, l_s, torch.ones(1, 3, dtype=torch.bool), thresholds=thresholds)
    assert r.regime[0, :2].tolist() == [Regime.HT, Regime.HS]
    # Token 2: A = 0 < threshold, and q_S + q_T equal to the threshold sum -> LH, just below -> LL.
    q = math.exp(l_t[0, 2].double().item())
    thresholds = {"A": 0.1, "q_student": math.exp(l_s[0, 2].double().item()), "q_teacher": q}
    r = route_tokens(l_t, l_s, torch.ones(1, 3, dtype=torch.bool), thresholds=thresholds)
    assert r.regime[0, 2].item() == Regime.LH
    thresholds["q_teacher"] = math.nextafter(q, 1.0)
    r = route_tokens(l_t, l_s, torch.ones(1, 3, dtype=torch.bool), thresholds=thresholds)
    assert r.regime[0, 2].item() == Regime.LL


def test_masked_tokens_are_minus_one_and_do_not_touch_thresholds():
    l_t = torch.tensor([[-0.1, -3.0, float("nan")]])
    l_s = torch.tensor([[-0.2, -0.5, float("inf")]])
    mask = torch.tensor([[True, True, False]])
    r = route_tokens(l_t, l_s, mask, outlier_fraction=0.0)
    assert r.regime[0, 2].item() == -1
    assert r.thresholds["A"] == pytest.approx((0.1 + 2.5) / 2, rel=1e-6)
    assert all(math.isfinite(v) for v in r.thresholds.values())


def test_outliers_are_trimmed_from_the_mean_but_still_routed():
    l_s = torch.zeros(1, 20) - 1.0
    l_t = l_s.clone()
    l_t[0, 0] = -30.0  # the one outlier gap (floor(0.05 * 20) = 1 dropped)
    l_t[0, 1:] = -1.0 + torch.linspace(0, 0.5, 19)
    r = route_tokens(l_t, l_s, torch.ones(1, 20, dtype=torch.bool))
    expected = (l_t[0, 1:].double() - l_s[0, 1:].double()).abs().mean().item()
    assert r.thresholds["A"] == pytest.approx(expected, rel=1e-9)
    assert r.regime[0, 0].item() == Regime.HS  # routed although trimmed


def test_edge_check_sends_a_high_gap_token_to_the_teacher_only_when_its_verdict_survives_without_context():
    # Four high-gap tokens (A = |ln q_T - ln q_S| = ln 4 each, threshold given), every combination of
    # the privileged teacher's and the plain teacher's verdict against the privileged student.
    from dopd_vl.method.routing import TokenSignals, assign_regimes

    q_t = torch.tensor([0.8, 0.8, 0.2, 0.2], dtype=torch.float64)
    q_s = torch.tensor([0.2, 0.2, 0.8, 0.8], dtype=torch.float64)
    q_plain = torch.tensor([0.5, 0.1, 0.1, 0.9], dtype=torch.float64)
    thresholds = {"A": 1.0, "q_student": 0.5, "q_teacher": 0.5}
    gap = (q_t.log() - q_s.log()).abs()
    paper = assign_regimes(TokenSignals(gap, q_t, q_s), thresholds)
    checked = assign_regimes(TokenSignals(gap, q_t, q_s, q_plain), thresholds)
    assert paper.tolist() == [Regime.HT, Regime.HT, Regime.HS, Regime.HS]
    # teacher wins with and without context -> HT; wins only with it (information) -> HS;
    # rejects with and without (capability) -> HT; rejects only with it -> HS.
    assert checked.tolist() == [Regime.HT, Regime.HS, Regime.HT, Regime.HS]
    # Low-gap tokens are untouched by the check.
    low = TokenSignals(
        torch.zeros(2, dtype=torch.float64), q_t[:2], q_t[:2], torch.tensor([0.0, 1.0], dtype=torch.float64)
    )
    assert assign_regimes(low, thresholds).tolist() == [Regime.LH, Regime.LH]
