"""Per-token privilege signals, trimmed-mean thresholds and the four DOPD regimes (docs/design.md §1.2–§1.4).

Signals, thresholds and regimes never carry gradient. Thresholds are computed in float64 so that
a token whose value equals the threshold lands deterministically on the "high" side.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from enum import IntEnum

import torch
from torch import Tensor

from dopd_vl.method.views import DIAGNOSTIC_VIEWS

__all__ = [
    "Regime",
    "REGIME_NAMES",
    "REGIME_COLORS",
    "TokenSignals",
    "trimmed_mean",
    "token_signals",
    "information_edge",
    "compute_thresholds",
    "assign_regimes",
    "token_diagnostics",
    "summarise_diagnostics",
    "route_names",
    "INFORMATION_EDGE_NATS",
]


class Regime(IntEnum):
    """Regime codes; the order 0-3 is part of the public API [paper]."""

    LH = 0  # low gap, high confidence: light RKL to the privileged teacher
    LL = 1  # low gap, low confidence: weak RKL to the privileged student
    HT = 2  # high gap, teacher more confident: strong full-vocabulary JS to the teacher
    HS = 3  # high gap, student more confident: light RKL to the privileged student


REGIME_NAMES: tuple[str, ...] = tuple(r.name for r in Regime)
REGIME_COLORS: dict[str, str] = {"LH": "#4e9be6", "LL": "#9a9a9a", "HT": "#e4572e", "HS": "#59a14f"}
"""The one regime palette of every plot and page (colour-blind safe pairs: blue / grey, red / green)."""


@dataclass
class TokenSignals:
    """Per-token signals of valid tokens that routers split on; an objective fills the ones it needs.

    DOPD's Eq. 1 signals: A = |l_T - l_S|, q_T = exp(l_T), q_S = exp(l_S). The comparison methods
    add their own (docs/design.md §1.10): the target's entropy (EOPD) and the visual advantage
    l_T(y|x,p) - l_T(y|x) (VA-OPD).
    """

    advantage_gap: Tensor | None = None
    q_teacher: Tensor | None = None
    q_student: Tensor | None = None
    q_teacher_plain: Tensor | None = None
    """The teacher *without* the context on the same token; only for `edge_check: plain_teacher` [ours]."""
    teacher_entropy: Tensor | None = None
    """Entropy of the target view's distribution (EOPD)."""
    visual_advantage: Tensor | None = None
    """log p_T(y | x, p) - log p_T(y | x): what the privileged context adds to the teacher (VA-OPD)."""

    def present(self) -> dict[str, Tensor]:
        """The signals that are set, by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def map(self, fn) -> TokenSignals:
        """The same signals with `fn` applied to each present one (selecting, gathering, concatenating)."""
        return TokenSignals(**{name: fn(name, value) for name, value in self.present().items()})


def trimmed_mean(values: Tensor, outlier_fraction: float = 0.05) -> Tensor:
    """Mean of the N - floor(f*N) smallest values of a 1-D tensor [paper, made exact by ours].

    Computed in float64; ties at the cut are harmless because equal values have the same mean.
    """
    if values.dim() != 1:
        raise ValueError(f"trimmed_mean expects a 1-D tensor, got shape {tuple(values.shape)}")
    if not 0.0 <= outlier_fraction < 1.0:
        raise ValueError(f"outlier_fraction must be in [0, 1), got {outlier_fraction}")
    n = values.numel()
    if n == 0:
        raise ValueError("trimmed_mean of an empty tensor: no valid tokens")
    keep = n - math.floor(outlier_fraction * n)
    kept = torch.sort(values.detach().double()).values[:keep]
    return kept.mean()


def token_signals(
    teacher_logprob: Tensor, student_priv_logprob: Tensor, teacher_plain_logprob: Tensor | None = None
) -> TokenSignals:
    """Eq. 1: the privilege advantage gap and both confidences, without gradient (and, for the
    edge check, the plain teacher's confidence)."""
    l_t = teacher_logprob.detach().double()
    l_s = student_priv_logprob.detach().double()
    q_plain = teacher_plain_logprob.detach().double().exp() if teacher_plain_logprob is not None else None
    return TokenSignals(
        advantage_gap=(l_t - l_s).abs(), q_teacher=l_t.exp(), q_student=l_s.exp(), q_teacher_plain=q_plain
    )


def information_edge(teacher_priv_logprob: Tensor, teacher_plain_logprob: Tensor) -> Tensor:
    """What the privileged context adds to the teacher on a token, l_T(y|x,p) - l_T(y|x), in float64
    without gradient: VA-OPD's visual advantage, and the information edge `dopd diagnose` reports."""
    return teacher_priv_logprob.detach().double() - teacher_plain_logprob.detach().double()


def compute_thresholds(signals: TokenSignals, outlier_fraction: float = 0.05) -> dict[str, float]:
    """Trimmed batch means of A, q_S and q_T over the valid tokens given (1-D signals).

    The trainer passes the signals of every valid token of the optimizer step, gathered over
    micro-batches and processes, which makes the thresholds exactly those of the whole step.
    """
    return {
        "A": trimmed_mean(signals.advantage_gap.reshape(-1), outlier_fraction).item(),
        "q_student": trimmed_mean(signals.q_student.reshape(-1), outlier_fraction).item(),
        "q_teacher": trimmed_mean(signals.q_teacher.reshape(-1), outlier_fraction).item(),
    }


def assign_regimes(signals: TokenSignals, thresholds: dict[str, float]) -> Tensor:
    """Table 1.4. Boundaries: A == threshold is high; q_T == q_S is HT; equal sums are LH.

    With `q_teacher_plain` (the edge check, [ours], not the paper's rule), a high-gap token goes to
    the teacher (HT) when the teacher's verdict on it relative to the privileged student is the
    same with and without the context, i.e. a capability edge; a verdict that flips without the
    context is information the student never has, and goes to the privileged student (HS).
    """
    a, q_t, q_s = signals.advantage_gap, signals.q_teacher, signals.q_student
    high_gap = a >= thresholds["A"]
    confident = (q_s + q_t) >= (thresholds["q_student"] + thresholds["q_teacher"])
    teacher_wins = q_t >= q_s
    if signals.q_teacher_plain is not None:
        teacher_wins = teacher_wins == (signals.q_teacher_plain >= q_s)
    low = torch.where(confident, int(Regime.LH), int(Regime.LL))
    high = torch.where(teacher_wins, int(Regime.HT), int(Regime.HS))
    return torch.where(high_gap, high, low).long()


# ------------------------------------------------------------ routing statistics (§1.11)
INFORMATION_EDGE_NATS = 1.0
"""The information edge is reported as a mean and as the share of tokens above this many nats."""


def token_diagnostics(
    token_logprob: dict[str, Tensor], outlier_fraction: float = 0.05
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Per-token diagnostics of one step's valid tokens, and the step's thresholds.

    `token_logprob` holds 1-D log-probs of the sampled tokens for every view of DIAGNOSTIC_VIEWS
    (and `student`, the student's own plain view, for the capability edge). Thresholds are the
    trimmed means over these tokens, as the trainer computes them over a step (§1.3); regimes are
    routed by `routing.assign_regimes`, the one definition, with and without the edge check.
    """
    missing = [v for v in DIAGNOSTIC_VIEWS if v not in token_logprob]
    if missing:
        raise ValueError(f"token_diagnostics needs the sampled-token log-probs of views {missing}")
    signals = token_signals(
        token_logprob["teacher_priv"], token_logprob["student_priv"], token_logprob["teacher_plain"]
    )
    thresholds = compute_thresholds(signals, outlier_fraction)
    per_token = {
        "advantage_gap": signals.advantage_gap,
        "q_teacher": signals.q_teacher,
        "q_student": signals.q_student,
        "regime": assign_regimes(dataclasses.replace(signals, q_teacher_plain=None), thresholds),
        "regime_edge_check": assign_regimes(signals, thresholds),
        "information_edge": information_edge(token_logprob["teacher_priv"], token_logprob["teacher_plain"]),
    }
    if "student" in token_logprob:
        per_token["capability_edge"] = (
            token_logprob["teacher_plain"].detach().double() - token_logprob["student"].detach().double()
        )
    return per_token, thresholds


def summarise_diagnostics(per_token: dict[str, Tensor]) -> dict[str, float]:
    """Shares and means over the tokens of `token_diagnostics` (one step's, or several steps'
    concatenated, each token routed with its own step's thresholds)."""
    n = max(per_token["regime"].numel(), 1)
    out = {"endorsement": float((per_token["q_teacher"] >= per_token["q_student"]).double().sum()) / n}
    for key, prefix in (("regime", "frac"), ("regime_edge_check", "edge_check/frac")):
        for code, name in enumerate(REGIME_NAMES):
            out[f"{prefix}/{name}"] = float((per_token[key] == code).double().sum()) / n
    edge = per_token["information_edge"]
    out["information_edge/mean"] = float(edge.mean()) if edge.numel() else 0.0
    out["information_edge/above_1nat"] = float((edge > INFORMATION_EDGE_NATS).double().sum()) / n
    out["advantage_gap/mean"] = float(per_token["advantage_gap"].mean()) if edge.numel() else 0.0
    if "capability_edge" in per_token:
        out["capability_edge/mean"] = float(per_token["capability_edge"].mean()) if edge.numel() else 0.0
    return out


def route_names(objective) -> tuple[str, ...]:
    """A name for each route index of an objective (its regimes, split groups or single route)."""
    if objective.router == "regimes":
        return REGIME_NAMES
    if objective.router == "split":
        return (f"low_{objective.split_on}", f"high_{objective.split_on}")
    if objective.router in ("all", "prune"):
        return (objective.name,)
    return tuple(f"route{i}" for i in range(len(objective.routes)))
