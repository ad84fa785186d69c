"""A micro-batch's token plan (docs/design.md §1.6, §4.4): for each valid response token, the route
it takes, the weight its loss gets and its DOPD regime, computed once and together.

Every per-token quantity of the step lives in one shape: the N valid response tokens of a
micro-batch, flattened in (sequence, position) order. A sequence's tokens are consecutive, so
`lengths` ([B], valid tokens per sequence) is all the layout a plan needs; the [B, T] grid appears
only where a model input needs it. The weights turn a sum of route losses into the objective's
loss (Eq. 1.6; VA-OPD's group means and rollout weights, §1.10); step totals make every
micro-batch's loss a share of the step's, so the step does not depend on how it is split.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from dopd_vl.method.objectives import Objective, ObjectiveConfig, build_objective
from dopd_vl.method.outcomes import Outcomes, balance_rollouts, margin_shifts, rollout_reward_means, trust_routes
from dopd_vl.method.routing import TokenSignals, assign_regimes

__all__ = [
    "TokenPlan",
    "plan_tokens",
    "token_weights",
    "normalization_weights",
    "rollout_weights",
    "Routing",
    "route_tokens",
]


@dataclass
class TokenPlan:
    """What happens to each of a micro-batch's N valid response tokens."""

    route: Tensor
    """[N] long: the index of the objective's route the token takes (-1: no loss)."""
    weight: Tensor
    """[N] float64: the factor of the token's route loss in the step's loss."""
    regime: Tensor | None
    """[N] long: the token's DOPD regime (Table 1.4) when the objective has DOPD's signals, else None."""
    target_shift: Tensor | None = None
    """[N] float64 added to the sampled route's target log-prob (uni_opd's margin shift), or None."""
    counts: dict[str, float] = field(default_factory=dict)
    """Token counts of the verdicts' overrides (`trust/*`, `uni_opd/*`): the step's metrics sum them."""


def plan_tokens(
    objective: Objective,
    lengths: Tensor,
    signals: TokenSignals | None,
    stats: dict[str, float],
    prune_keys: Tensor | None = None,
    groups: Tensor | None = None,
    num_sequences: int | None = None,
    num_tokens: int | None = None,
    outcomes: Outcomes | None = None,
) -> TokenPlan:
    """The plan of a micro-batch's valid tokens: routes, weights and regimes.

    Args:
        objective: the run's objective (router, routes, normalisation).
        lengths: [B] the number of valid response tokens of each sequence.
        signals: the routing signals over the N valid tokens; None for objectives without any.
        stats: the step statistics (`Objective.step_statistics`): thresholds, the prune cut-off,
            the split groups' sizes.
        prune_keys: [N] pruned_opd's per-token keys.
        groups: [B] the prompt (record) index of each response: VA-OPD's rollout groups; None: one.
        num_sequences, num_tokens: the step's totals; None: this micro-batch's own.
        outcomes: the verdicts (and uni_opd's sampling log-probs) when the objective reads them
            (`Objective.response_verdicts`); their overrides are outcomes.py's.

    Returns:
        TokenPlan: [N] route, weight and regime; uni_opd's target shift; the overrides' counts.
    """
    lengths = lengths.long()
    valid = torch.ones(int(lengths.sum()), dtype=torch.bool, device=lengths.device)
    route = objective.assign_routes(valid, signals, stats, prune_keys)
    regime = None
    if signals is not None and signals.advantage_gap is not None:
        regime = assign_regimes(signals, stats)
    weight = token_weights(objective, lengths, route, stats, signals, groups, num_sequences, num_tokens)
    plan = TokenPlan(route, weight, regime)
    if objective.response_verdicts:
        if outcomes is None:
            raise ValueError(f"objective {objective.name!r} reads verdicts: pass the micro-batch's outcomes")
        _apply_outcomes(objective, plan, lengths, outcomes, groups)
    return plan


def shifted_target(target_logprob: Tensor, shift: Tensor) -> Tensor:
    """uni_opd's margin as the loss paths read it: the sampled route's target token log-probs [N]
    plus the plan's `target_shift` (a shift of the reward l_T - l_old)."""
    return target_logprob + shift.to(target_logprob)


def _apply_outcomes(objective: Objective, plan: TokenPlan, lengths: Tensor, outcomes: Outcomes, groups) -> None:
    """The verdicts' overrides of a plan, in place: DOPD's `trust: verified` routes, or uni_opd's
    log-prob mask, balancing and margin shift (outcomes.py)."""
    c = objective.config
    groups = torch.zeros(lengths.numel(), dtype=torch.long) if groups is None else groups
    if c.trust == "verified":
        plan.route, plan.counts = trust_routes(plan.regime, lengths, outcomes)
        return
    # uni_opd: the token reward r_t = l_T - l_old, from the teacher view's and the sampling policy's log-probs
    reward = outcomes.target_logprob.double() - outcomes.student_logprob.double()
    masked = reward.abs() >= c.uni_logprob_mask
    keep = balance_rollouts(outcomes.response, groups, c.uni_balance_ratio, outcomes.seed)
    kept_token = torch.repeat_interleave(keep, lengths.cpu()).to(plan.route.device)
    means = rollout_reward_means(reward, lengths, ~masked)
    shift = margin_shifts(
        means, outcomes.response, groups, keep, c.uni_margin, c.uni_margin_mode, c.uni_margin_direction
    )
    plan.target_shift = torch.repeat_interleave(shift, lengths.cpu()).to(reward.device)
    plan.route = torch.where(masked | ~kept_token, -1, plan.route)
    plan.counts = {
        "uni_opd/masked": float(masked.sum()),
        "uni_opd/dropped": float((~kept_token).sum()),
        "uni_opd/shifted": float((plan.target_shift != 0).sum()),
    }


def token_weights(
    objective: Objective,
    lengths: Tensor,
    route: Tensor,
    stats: dict[str, float],
    signals: TokenSignals | None = None,
    groups: Tensor | None = None,
    num_sequences: int | None = None,
    num_tokens: int | None = None,
) -> Tensor:
    """Per-token factors [N] that turn a sum of route losses into the objective's loss.

    Every objective but VA-OPD: `normalization` (Eq. 1.6). VA-OPD: the mean over the step's
    tokens of each group (high / low visual advantage; sizes from `stats`), times the rollout
    weight of the token's response (`rollout_weights`).

    Args:
        objective: the objective whose loss the weights normalise.
        lengths: [B] valid response tokens per sequence.
        route: [N] route index per valid token (-1: no loss).
        stats: the step statistics (VA-OPD reads its groups' sizes, `count/route0` / `count/route1`).
        signals: the routing signals over the valid tokens (VA-OPD's visual advantage).
        groups: [B] prompt index of each response (VA-OPD's rollout groups); None: one group.
        num_sequences, num_tokens: the step's totals; None: this batch's own.

    Returns:
        [N] float64 weights (0 for VA-OPD's tokens without a route).
    """
    c = objective.config
    if c.name != "va_opd":
        return normalization_weights(lengths, c.normalization, num_sequences, num_tokens)
    counts = torch.tensor(
        [stats["count/route0"], stats["count/route1"]], dtype=torch.float64, device=route.device
    ).clamp_min(1)
    per_token = torch.where(route >= 0, 1.0 / counts[route.clamp(0, 1)], 0.0)
    if c.va_temperature is not None:
        per_token = per_token * _per_token(rollout_weights(objective, lengths, signals, groups), lengths)
    return per_token


def rollout_weights(
    objective: Objective, lengths: Tensor, signals: TokenSignals, groups: Tensor | None = None
) -> Tensor:
    """VA-OPD's rollout weights: within each prompt's G rollouts, G * softmax(mean visual advantage /
    va_temperature), so a prompt's weights average 1.

    Args:
        objective: the va_opd objective (its config's va_temperature).
        lengths: [B] valid response tokens per sequence.
        signals: routing signals with `visual_advantage` over the N valid tokens.
        groups: [B] prompt index of each response; None: one group.

    Returns:
        [B] float64 weight per response.
    """
    lengths = lengths.long()
    values = signals.visual_advantage.double()
    mean_va = torch.stack([part.sum() for part in values.split(lengths.tolist())]) if lengths.numel() else values
    mean_va = mean_va / lengths.clamp_min(1).to(mean_va.device)
    groups = torch.zeros(lengths.numel(), dtype=torch.long) if groups is None else groups
    groups = groups.to(mean_va.device)
    weights = torch.ones_like(mean_va)
    for g in groups.unique():
        members = groups == g
        weights[members] = members.sum() * torch.softmax(mean_va[members] / objective.config.va_temperature, 0)
    return weights


def normalization_weights(
    lengths: Tensor, normalization: str, num_sequences: int | None = None, num_tokens: int | None = None
) -> Tensor:
    """Per-token factors [N] that turn a sum of token losses into Eq. 1.6's normalised loss.

    Passing the step totals makes the loss of each micro-batch a correctly weighted share of the
    step's loss, so the step's value and gradient do not depend on how it is split (the TRL #4719 /
    ms-swift #10165 bug class).

    Args:
        lengths: [B] valid response tokens per sequence.
        normalization: `sequence` (mean over sequences of per-sequence token means) or `token`.
        num_sequences: the step's number of sequences with a valid token; None: this batch's.
        num_tokens: the step's number of valid tokens; None: this batch's.

    Returns:
        [N] float64 weights.
    """
    lengths = lengths.long()
    if normalization == "sequence":
        n_seq = num_sequences if num_sequences is not None else int((lengths > 0).sum())
        weights = 1.0 / (lengths.clamp_min(1).double() * max(n_seq, 1))
        return _per_token(weights, lengths)
    if normalization == "token":
        n_tok = num_tokens if num_tokens is not None else int(lengths.sum())
        return torch.full((int(lengths.sum()),), 1.0 / max(n_tok, 1), dtype=torch.float64, device=lengths.device)
    raise ValueError(f"normalization must be 'sequence' or 'token', got {normalization!r}")


def _per_token(per_sequence: Tensor, lengths: Tensor) -> Tensor:
    """[B] -> [N]: each sequence's value repeated over its valid tokens."""
    return torch.repeat_interleave(per_sequence, lengths.to(per_sequence.device))


@dataclass
class Routing:
    """DOPD's routing of a [B, T] batch (`route_tokens`): per token, -1 / 0 where masked."""

    regime: Tensor  # LongTensor like the inputs, -1 where mask is False
    advantage_gap: Tensor  # 0 where mask is False
    q_teacher: Tensor
    q_student: Tensor
    thresholds: dict[str, float]  # keys "A", "q_student", "q_teacher"


def route_tokens(
    teacher_logprob: Tensor,
    student_priv_logprob: Tensor,
    mask: Tensor,
    outlier_fraction: float = 0.05,
    thresholds: dict[str, float] | None = None,
) -> Routing:
    """Route every valid token of a [B, T] batch to one DOPD regime (Table 1.4), through the engine's
    own path: the valid tokens flattened once, DOPD's signals, step statistics and token plan, the
    regimes put back on the [B, T] grid.

    Args:
        teacher_logprob: [B, T] the privileged teacher's log-probs of the sampled tokens.
        student_priv_logprob: [B, T] the privileged student's.
        mask: [B, T] valid response tokens.
        outlier_fraction: the share of largest values left out of the threshold means.
        thresholds: None computes them over the valid tokens of this batch (`threshold_scope:
            local`); the trainer passes step-wide thresholds from `compute_thresholds` instead.

    Returns:
        Routing: the regime per token (-1 where masked), the advantage gap, both confidences and
        the thresholds.
    """
    if teacher_logprob.shape != student_priv_logprob.shape or teacher_logprob.shape != mask.shape:
        raise ValueError(
            "route_tokens: teacher_logprob, student_priv_logprob and mask must have one shape, got "
            f"{tuple(teacher_logprob.shape)}, {tuple(student_priv_logprob.shape)}, {tuple(mask.shape)}"
        )
    mask = mask.bool()
    objective = build_objective(ObjectiveConfig(outlier_fraction=outlier_fraction))
    # Only the valid tokens are read: masked slots may hold anything (inf, nan).
    signals = objective.token_signals(
        {"teacher_priv": teacher_logprob[mask], "student_priv": student_priv_logprob[mask]}
    )
    if thresholds is None:
        thresholds = objective.step_statistics(signals)
    plan = plan_tokens(objective, mask.sum(-1), signals, thresholds)

    def grid(values: Tensor, fill) -> Tensor:
        return torch.full(mask.shape, fill, dtype=values.dtype, device=mask.device).masked_scatter(mask, values)

    return Routing(
        regime=grid(plan.regime, -1),
        advantage_gap=grid(signals.advantage_gap, 0.0),
        q_teacher=grid(signals.q_teacher, 0.0),
        q_student=grid(signals.q_student, 0.0),
        thresholds=thresholds,
    )
