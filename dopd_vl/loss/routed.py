"""Loss arithmetic both paths share (docs/design.md §1.5, §1.6, §1.10): a route's per-token loss
and the per-token weights that turn a sum of route losses into an objective's loss.

The objective (dopd_vl/method/objectives.py) says which route a token takes; this module says what
that costs. The reference path (reference.py) and the chunked path (chunked.py, the kernels) call
the same two functions, so they cannot drift apart.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dopd_vl.method.divergences import token_divergence, upcast
from dopd_vl.method.objectives import Objective, ObjectiveConfig, Route
from dopd_vl.method.routing import TokenSignals

__all__ = ["route_divergence", "token_weights", "normalization_weights", "rollout_weights"]


def route_divergence(
    route: Route,
    config: ObjectiveConfig,
    student_logp: Tensor,
    target_logp: Tensor | None,
    token_ids: Tensor,
    token_logprob: dict[str, Tensor],
) -> Tensor:
    """A route's weighted per-token loss over rows [n, V]: the one definition both paths use.

    Args:
        route: the route (target view, divergence terms, support, weight; ExOPD's reference view).
        config: the objective section (top_k, topk_source, topk_tail, js_beta).
        student_logp: [n, V] student log-probs, with gradient.
        target_logp: [n, V] the target view's log-probs; None for a sampled route, which reads only
            `token_logprob`.
        token_ids: [n] the sampled tokens.
        token_logprob: view -> [n] sampled-token log-probs of the route's views (the sampled support
            and the extrapolated target need only those).

    Returns:
        [n] the route's weight times the sum of its divergence terms, per token.
    """
    target_token = None
    if route.support == "sampled":
        target_token = upcast(token_logprob[route.target])
        if route.reference is not None:  # ExOPD: sampled RKL to lambda*l_T + (1 - lambda)*l_ref
            lam = route.extrapolation
            target_token = lam * target_token + (1.0 - lam) * upcast(token_logprob[route.reference])
    loss = None
    for name, weight in route.terms:
        d = token_divergence(
            name,
            route.support,
            student_logp,
            target_logp,
            token_ids,
            target_token_logp=target_token,
            top_k=config.top_k,
            topk_source=config.topk_source,
            topk_tail=config.topk_tail,
            js_beta=config.js_beta,
        )
        loss = weight * d if loss is None else loss + weight * d
    return loss


def token_weights(
    objective: Objective,
    mask: Tensor,
    route: Tensor,
    stats: dict[str, float],
    signals: TokenSignals | None = None,
    groups: Tensor | None = None,
    num_sequences: int | None = None,
    num_tokens: int | None = None,
) -> Tensor:
    """Per-token factors [B, T] that turn a sum of route losses into the objective's loss.

    Every objective but VA-OPD: `normalization` (Eq. 1.6). VA-OPD: the mean over the step's
    tokens of each group (high / low visual advantage; sizes from `stats`), times the rollout
    weight of the token's response (`rollout_weights`). Step totals make every micro-batch's
    loss a share of the step's.

    Args:
        objective: the objective whose loss the weights normalise.
        mask: [B, T] valid response tokens.
        route: [B, T] route index per token (-1: no loss).
        stats: the step statistics (VA-OPD reads its groups' sizes, `count/route0` / `count/route1`).
        signals: the routing signals (VA-OPD's visual advantage), [B, T] or over the valid tokens.
        groups: [B] prompt index of each response (VA-OPD's rollout groups); None: one group.
        num_sequences, num_tokens: the step's totals; None: this batch's own.

    Returns:
        [B, T] float64 weights, 0 outside `mask`.
    """
    c = objective.config
    if c.name != "va_opd":
        return normalization_weights(mask, c.normalization, num_sequences, num_tokens)
    mask = mask.bool()
    counts = torch.tensor(
        [stats["count/route0"], stats["count/route1"]], dtype=torch.float64, device=mask.device
    ).clamp_min(1)
    per_token = torch.where(mask & (route >= 0), 1.0 / counts[route.clamp(0, 1)], 0.0)
    if c.va_temperature is not None:
        per_token = per_token * rollout_weights(objective, mask, signals, groups)[:, None]
    return per_token


def rollout_weights(objective: Objective, mask: Tensor, signals: TokenSignals, groups: Tensor | None = None) -> Tensor:
    """VA-OPD's rollout weights: within each prompt's G rollouts, G * softmax(mean visual advantage /
    va_temperature), so a prompt's weights average 1.

    Args:
        objective: the va_opd objective (its config's va_temperature).
        mask: [B, T] valid response tokens.
        signals: routing signals with `visual_advantage`, [B, T] or over the valid tokens [N].
        groups: [B] prompt index of each response; None: one group.

    Returns:
        [B] float64 weight per response.
    """
    mask = mask.bool()
    va = torch.zeros(mask.shape, dtype=torch.float64, device=mask.device)
    values = signals.visual_advantage.double()
    va[mask] = values[mask] if values.shape == mask.shape else values  # [B, T], or [N] over the valid tokens
    mean_va = va.sum(-1) / mask.sum(-1).clamp_min(1)
    groups = (
        torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device) if groups is None else groups.to(mask.device)
    )
    weights = torch.ones_like(mean_va)
    for g in groups.unique():
        members = groups == g
        weights[members] = members.sum() * torch.softmax(mean_va[members] / objective.config.va_temperature, 0)
    return weights


def normalization_weights(
    mask: Tensor, normalization: str, num_sequences: int | None = None, num_tokens: int | None = None
) -> Tensor:
    """Per-token factors that turn a sum of token losses into Eq. 1.6's normalised loss.

    Passing the step totals makes the loss of each micro-batch a correctly weighted share of the
    step's loss, so the step's value and gradient do not depend on how it is split (the TRL #4719 /
    ms-swift #10165 bug class).

    Args:
        mask: [B, T] valid response tokens.
        normalization: `sequence` (mean over sequences of per-sequence token means) or `token`.
        num_sequences: the step's number of sequences with a valid token; None: this batch's.
        num_tokens: the step's number of valid tokens; None: this batch's.

    Returns:
        [B, T] float64 weights, 0 outside `mask`.
    """
    mask = mask.bool()
    lengths = mask.sum(-1, keepdim=True).clamp_min(1)
    if normalization == "sequence":
        n_seq = num_sequences if num_sequences is not None else int((mask.sum(-1) > 0).sum())
        weights = 1.0 / (lengths.double() * max(n_seq, 1))
    elif normalization == "token":
        n_tok = num_tokens if num_tokens is not None else int(mask.sum())
        weights = torch.full_like(lengths, 1.0 / max(n_tok, 1), dtype=torch.float64)
    else:
        raise ValueError(f"normalization must be 'sequence' or 'token', got {normalization!r}")
    return torch.where(mask, weights.expand_as(mask), 0.0)
