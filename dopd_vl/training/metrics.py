"""What one step leaves behind (docs/design.md §4.5): a micro-batch's share of the loss, and the
step's metrics over every token of the step on every process."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dopd_vl.distributed import gather, reduce_sum
from dopd_vl.method.objectives import Objective
from dopd_vl.method.plan import TokenPlan
from dopd_vl.method.routing import REGIME_NAMES, summarise_diagnostics, token_diagnostics
from dopd_vl.method.views import DIAGNOSTIC_VIEWS
from dopd_vl.training.step import ScoredBatch

__all__ = ["LossShare", "step_metrics"]

THRESHOLD_METRICS = ("A", "q_student", "q_teacher", "teacher_entropy", "visual_advantage")


@dataclass
class LossShare:
    """One micro-batch's share of the step's loss, after its backward."""

    loss: float
    token_loss: Tensor  # [N] route-weighted divergence per valid token (detached)
    entropy: Tensor  # [N] the student's entropy per valid token
    plan: TokenPlan  # [N] the route, weight and DOPD regime each token had


def step_metrics(
    objective: Objective,
    scored: list[ScoredBatch],
    shares: list[LossShare],
    stats: dict[str, float],
    accelerator,
    diagnostics: bool = False,
) -> dict[str, float]:
    """Thresholds, regime fractions (the plans' regimes), per-regime loss and A, entropies (and with
    `diagnostics`, the diag/* figures, §1.11) over the step's tokens, gathered over all processes."""

    def pooled(parts) -> Tensor:
        return gather(accelerator, torch.cat(list(parts)).double())

    metrics = {f"threshold/{k}": v for k, v in stats.items() if k in THRESHOLD_METRICS}
    token_loss = pooled(share.token_loss for share in shares)
    metrics["entropy/student"] = pooled(share.entropy for share in shares).mean().item()
    if "teacher_priv" in scored[0].targets:
        metrics["entropy/teacher_priv"] = pooled(s.targets["teacher_priv"].entropy for s in scored).mean().item()
    if shares[0].plan.regime is not None:
        regime = pooled(share.plan.regime for share in shares)
        gap = pooled(s.signals.advantage_gap for s in scored)
        for code, name in enumerate(REGIME_NAMES):
            sel = regime == code
            count = int(sel.sum())
            metrics[f"frac/{name}"] = count / max(regime.numel(), 1)
            metrics[f"loss/{name}"] = token_loss[sel].mean().item() if count else 0.0
            metrics[f"A/{name}"] = gap[sel].mean().item() if count else 0.0
    elif objective.router == "split":  # EOPD / VA-OPD: the share of tokens at or above the split threshold
        route = pooled(share.plan.route for share in shares)
        metrics[f"frac/high_{objective.split_on}"] = (route == 1).double().mean().item()
    counted = sorted({k for share in shares for k in share.plan.counts})
    if counted:  # the verdicts' overrides (trust/*, uni_opd/*): shares of the step's valid tokens
        totals = torch.tensor(
            [[share.plan.counts.get(k, 0.0) for k in counted] + [float(share.plan.route.numel())] for share in shares],
            dtype=torch.float64,
        ).sum(0)
        totals = reduce_sum(accelerator, totals.to(token_loss.device)).cpu()
        metrics.update({k: float(v) / max(float(totals[-1]), 1.0) for k, v in zip(counted, totals[:-1])})
    if diagnostics:  # what DOPD's routing would see on this step, whatever the objective
        logprob = {v: pooled(s.targets[v].token_logprob for s in scored) for v in DIAGNOSTIC_VIEWS}
        per_token, _ = token_diagnostics(logprob, objective.config.outlier_fraction)
        metrics.update({f"diag/{k}": v for k, v in summarise_diagnostics(per_token).items()})
    return metrics
