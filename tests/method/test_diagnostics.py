"""The per-token routing statistics (dopd_vl/method/routing.py) on a hand-checked case."""

import math
import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO))  # examples.toy_privilege
from dopd_vl.method.routing import summarise_diagnostics, token_diagnostics


def test_token_diagnostics_hand_checked_case():
    # Five tokens. l_T with the context, l_S (privileged student), l_T without the context.
    l_t = torch.log(torch.tensor([0.9, 0.2, 0.5, 0.05, 0.6], dtype=torch.float64))
    l_s = torch.log(torch.tensor([0.8, 0.6, 0.5, 0.5, 0.1], dtype=torch.float64))
    l_p = torch.log(torch.tensor([0.9, 0.7, 0.5, 0.01, 0.05], dtype=torch.float64))
    per_token, thresholds = token_diagnostics(
        {"teacher_priv": l_t, "student_priv": l_s, "teacher_plain": l_p}, outlier_fraction=0.0
    )
    a = (l_t - l_s).abs()
    assert thresholds["A"] == pytest.approx(float(a.mean()))  # 0.805: tokens 1, 3 and 4 are high-gap
    assert thresholds["q_teacher"] + thresholds["q_student"] == pytest.approx((2.25 + 2.5) / 5)  # 0.95
    # Token 0: low gap, q sum 1.7 >= 0.95 -> LH. Token 2: A = 0, sum 1.0 -> LH.
    # Token 1: A = ln 3 high, q_T < q_S -> HS; without the context the teacher (0.7) would beat the
    # student (0.6): the verdict flips (information) -> HS under the edge check too.
    # Token 3: A = ln 10 high, q_T < q_S -> HS; plain 0.01 < 0.5, the same verdict (capability) -> HT under the edge
    # check.
    # Token 4: A = ln 6 high, q_T > q_S -> HT; plain 0.05 < 0.1 flips -> HS under the edge check.
    assert per_token["regime"].tolist() == [0, 3, 0, 3, 2]
    assert per_token["regime_edge_check"].tolist() == [0, 3, 0, 2, 3]
    summary = summarise_diagnostics(per_token)
    assert summary["endorsement"] == pytest.approx(3 / 5)  # q_T >= q_S: tokens 0, 2 (equal), 4
    assert (
        summary["frac/HT"] == pytest.approx(0.2)
        and summary["frac/HS"] == pytest.approx(0.4)
        and summary["frac/LL"] == 0
    )
    assert summary["edge_check/frac/HT"] == pytest.approx(0.2) and summary["edge_check/frac/HS"] == pytest.approx(0.4)
    edge = [math.log(0.9 / 0.9), math.log(0.2 / 0.7), 0.0, math.log(0.05 / 0.01), math.log(0.6 / 0.05)]
    assert summary["information_edge/mean"] == pytest.approx(sum(edge) / 5)
    assert summary["information_edge/above_1nat"] == pytest.approx(2 / 5)  # ln 5 and ln 12
