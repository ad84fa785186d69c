"""The token plan: route, weight and regime of each valid token in one [N] shape, equal to an
independent float64 computation written here, to the reference path's, and to what the step's
metrics count."""

import math
from types import SimpleNamespace

import pytest
import torch

from dopd_vl.loss.reference import objective_loss
from dopd_vl.method.objectives import ObjectiveConfig, build_objective
from dopd_vl.method.plan import plan_tokens
from dopd_vl.method.routing import REGIME_NAMES
from dopd_vl.training.metrics import LossShare, step_metrics
from dopd_vl.training.step import ScoredBatch

# Three responses of 4, 2 and 3 valid tokens; per token (q_T, q_S) with the privileged context.
LENGTHS = [4, 2, 3]
Q_T = [0.5, 0.1, 0.8, 0.2, 0.6, 0.05, 0.9, 0.3, 0.4]
Q_S = [0.5, 0.1, 0.2, 0.8, 0.5, 0.4, 0.3, 0.35, 0.1]


def naive_plan(q_t: list[float], q_s: list[float], lengths: list[int], beta_routes: tuple, outlier: float = 0.0):
    """Table 1.4 by hand, in float64 Python numbers: A = |ln q_T - ln q_S|, trimmed means (none left
    out at outlier 0), regimes, DOPD's route = regime (None routes still carry their index) and
    Eq. 1.6's sequence normalisation 1 / (len_b * B)."""
    a = [abs(math.log(t) - math.log(s)) for t, s in zip(q_t, q_s)]
    n = len(a)
    keep = n - math.floor(outlier * n)

    def tmean(values):
        return sum(sorted(values)[:keep]) / keep

    a_bar, qt_bar, qs_bar = tmean(a), tmean(q_t), tmean(q_s)
    regime = []
    for ai, t, s in zip(a, q_t, q_s):
        if ai >= a_bar:
            regime.append(2 if t >= s else 3)  # HT / HS
        else:
            regime.append(0 if t + s >= qt_bar + qs_bar else 1)  # LH / LL
    weight = [1.0 / (length * len(lengths)) for length in lengths for _ in range(length)]
    return regime, weight


def signals_for(objective, q_t, q_s):
    lt, ls = torch.tensor(q_t, dtype=torch.float64).log(), torch.tensor(q_s, dtype=torch.float64).log()
    return objective.token_signals({"teacher_priv": lt, "student_priv": ls})


@pytest.mark.parametrize("regime_routes", [{}, {"LL": {"enabled": False}}])
def test_the_plan_equals_a_float64_computation_by_hand(regime_routes):
    objective = build_objective(ObjectiveConfig(outlier_fraction=0.0, regime_routes=regime_routes))
    signals = signals_for(objective, Q_T, Q_S)
    stats = objective.step_statistics(signals)
    plan = plan_tokens(objective, torch.tensor(LENGTHS), signals, stats)
    regime, weight = naive_plan(Q_T, Q_S, LENGTHS, ())
    assert plan.regime.tolist() == regime and set(regime) == {0, 1, 2, 3}  # every regime on this case
    assert plan.route.tolist() == regime  # DOPD's route index is its regime (a disabled one has no loss)
    assert plan.weight.dtype == torch.float64 and plan.weight.tolist() == pytest.approx(weight, rel=1e-15)


def test_the_plan_equals_the_reference_paths_on_a_fixed_case():
    """The reference path over float64 [B, T, V] logits and a plan from the same tokens' log-probs:
    same routes, regimes, and loss = sum of route losses times the plan's weights."""
    g = torch.Generator().manual_seed(0)
    b, t, v = len(LENGTHS), max(LENGTHS), 7
    mask = torch.arange(t)[None, :] < torch.tensor(LENGTHS)[:, None]
    logits = {
        k: torch.randn(b, t, v, generator=g, dtype=torch.float64) for k in ("student", "teacher_priv", "student_priv")
    }
    ids = torch.randint(0, v, (b, t), generator=g)
    objective = build_objective(ObjectiveConfig(top_k=3))
    out = objective_loss(objective, logits["student"], {k: logits[k] for k in objective.views}, ids, mask)

    def token_logprob(view):  # an independent log-softmax and gather, then the valid tokens
        lp = logits[view] - logits[view].logsumexp(-1, keepdim=True)
        return lp.gather(-1, ids[..., None]).squeeze(-1)[mask]

    signals = objective.token_signals({v_: token_logprob(v_) for v_ in objective.views})
    plan = plan_tokens(objective, mask.sum(-1), signals, objective.step_statistics(signals))
    assert plan.route.tolist() == out.route[mask].tolist()
    assert plan.regime.tolist() == out.regime[mask].tolist()
    assert (out.route[~mask] == -1).all() and (out.regime[~mask] == -1).all()
    assert out.loss.item() == pytest.approx(float((out.token_loss[mask] * plan.weight).sum()), rel=1e-12)


def test_the_steps_regime_fractions_are_the_plans():
    objective = build_objective(ObjectiveConfig(outlier_fraction=0.0))
    signals = signals_for(objective, Q_T, Q_S)
    stats = objective.step_statistics(signals)
    plan = plan_tokens(objective, torch.tensor(LENGTHS), signals, stats)
    n = len(Q_T)
    view = SimpleNamespace(response_mask=torch.arange(4)[None, :] < torch.tensor(LENGTHS)[:, None])
    scored = [ScoredBatch(view, {}, signals, None, torch.arange(len(LENGTHS)))]
    share = LossShare(0.0, torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), plan)
    metrics = step_metrics(objective, scored, [share], stats, SimpleNamespace(num_processes=1))
    for code, name in enumerate(REGIME_NAMES):
        assert metrics[f"frac/{name}"] == pytest.approx(float((plan.regime == code).double().mean()), abs=1e-15)
    assert sum(metrics[f"frac/{name}"] for name in REGIME_NAMES) == pytest.approx(1.0)
