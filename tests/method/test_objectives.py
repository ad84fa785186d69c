"""Objectives as configured (dopd_vl/method/objectives.py): regime switches and weights from the
config, and the views each objective scores."""

import pytest
import torch

from dopd_vl.loss.reference import dopd_loss
from dopd_vl.method.objectives import OBJECTIVES, ObjectiveConfig, build_objective
from dopd_vl.method.routing import Regime


def test_regime_switches_and_weights_come_from_config():
    g = torch.Generator().manual_seed(1)
    s, t, p = (torch.randn(2, 6, 5, generator=g, dtype=torch.float64) for _ in range(3))
    ids, mask = torch.randint(0, 5, (2, 6), generator=g), torch.ones(2, 6, dtype=torch.bool)
    base = dopd_loss(s, t, p, ids, mask, ObjectiveConfig(top_k=3))
    off = dopd_loss(
        s, t, p, ids, mask, ObjectiveConfig(top_k=3, regime_routes={"HT": {"enabled": False}, "LL": {"weight": 0.9}})
    )
    ht, ll = base.regime == Regime.HT, base.regime == Regime.LL
    assert (off.token_loss[ht] == 0).all()
    assert torch.allclose(off.token_loss[ll], base.token_loss[ll] * 3.0)
    with pytest.raises(ValueError, match="unknown regimes"):
        ObjectiveConfig(regime_routes={"XX": {}})
    with pytest.raises(ValueError, match="unknown keys"):
        build_objective(ObjectiveConfig(regime_routes={"HT": {"wieght": 2}}))


def test_objectives_compute_only_the_views_they_need():
    views = {name: build_objective(ObjectiveConfig(name=name)).views for name in OBJECTIVES}
    assert views == {
        "dopd": ("teacher_priv", "student_priv"),
        "vanilla_opd": ("teacher_plain",),
        "privileged_opd": ("teacher_priv",),
        "self_distill": ("student_priv",),
        "uniform": ("teacher_priv", "student_priv"),
        "pruned_opd": ("teacher_priv", "student_priv", "teacher_plain"),
        "eopd": ("teacher_priv",),
        "exopd": ("teacher_priv", "reference"),
        "va_opd": ("teacher_priv", "teacher_plain"),
        "vision_opd": ("student_priv",),
    }
