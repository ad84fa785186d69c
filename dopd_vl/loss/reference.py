"""The reference path of the routed loss: the objective over full [B, T, V] logits (docs/design.md §1.6, §5).

Readable and exact: every view's log-probabilities are materialised, so it serves small batches,
the tests and users who hold logits already. The trainer uses the chunked path (chunked.py),
which computes the same loss and gradient from hidden states (tested against this one).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from dopd_vl.loss.route_terms import route_divergence
from dopd_vl.method.divergences import entropy, upcast
from dopd_vl.method.objectives import Objective, ObjectiveConfig, build_objective
from dopd_vl.method.outcomes import Outcomes
from dopd_vl.method.plan import plan_tokens, shifted_target

__all__ = ["LossOutput", "objective_loss", "dopd_loss"]


@dataclass
class LossOutput:
    loss: Tensor  # scalar, gradient to the student only
    token_loss: Tensor  # route-weighted per-token divergence, 0 where masked (detached)
    regime: Tensor  # DOPD regime per token (-1 masked) when the privileged views exist, else route index
    route: Tensor  # route index per token (-1: masked or dropped)
    thresholds: dict[str, float]


def objective_loss(
    objective: Objective,
    student_logits: Tensor,
    view_logits: dict[str, Tensor],
    response_ids: Tensor,
    mask: Tensor,
    *,
    thresholds: dict[str, float] | None = None,
    vocab_size: int | None = None,
    num_sequences: int | None = None,
    num_tokens: int | None = None,
    prune_generator: torch.Generator | None = None,
    groups: Tensor | None = None,
    outcomes: Outcomes | None = None,
) -> LossOutput:
    """Reference path: the objective over full [B, T, V] logits at response positions (position t
    predicts response_ids[:, t]); the chunked path is tested against it.

    Args:
        objective: from `build_objective`.
        student_logits: [B, T, V] the student's logits on the plain view, with gradient.
        view_logits: view -> [B, T, V] logits of every view in `objective.views` (no gradient).
        response_ids: [B, T] the sampled tokens.
        mask: [B, T] valid response tokens.
        thresholds: routing thresholds; None: this batch's own. Pass the whole batch's (with
            `num_sequences` / `num_tokens`) to compute a share of a larger batch.
        vocab_size: the tokenizer's vocabulary, when the logits carry padded lm-head rows.
        num_sequences: the step's sequence count for the normalisation; None: this batch's.
        num_tokens: the step's valid-token count; None: this batch's.
        prune_generator: pruned_opd with `prune_by: random`: the keys' generator.
        groups: [B] VA-OPD's and uni_opd's rollout groups (a prompt index per response); None: one group.
        outcomes: the verdicts of the B responses (and their records' teacher verdicts), for an
            objective that reads them (`trust: verified`, uni_opd); the log-probs uni_opd reads
            are filled in here from the logits.

    Returns:
        LossOutput: the scalar loss (gradient to the student only), the per-token loss, regime and
        route, and the thresholds used.

    Raises:
        ValueError: a view the objective needs is missing, or the views' vocabularies differ.
    """
    c = objective.config
    mask = mask.bool()
    missing = [v for v in objective.views if v not in view_logits]
    if missing:
        raise ValueError(f"objective {objective.name!r} needs logits of views {missing}")
    vocab = _checked_vocab({"student": student_logits, **view_logits}, vocab_size)

    def log_probs(logits: Tensor) -> Tensor:
        # Masked slots may hold inf/nan: zero them before the softmax so nothing leaks.
        logits = torch.where(mask[..., None], upcast(logits[..., :vocab]), 0.0)
        return logits.log_softmax(-1)

    # One shape from here on: the N valid tokens in (sequence, position) order, as the trainer's plan.
    student_logp = log_probs(student_logits)[mask]
    target_logp = {v: log_probs(view_logits[v].detach())[mask] for v in objective.views}
    ids = response_ids[mask]
    token_logprob = {v: lp.gather(-1, ids[:, None]).squeeze(-1) for v, lp in target_logp.items()}

    signals = objective.token_signals(token_logprob, {v: entropy(lp) for v, lp in target_logp.items()})
    prune_keys = objective.prune_keys(signals, prune_generator) if objective.router == "prune" else None
    if thresholds is None:
        thresholds = objective.step_statistics(signals, prune_keys)
    lengths = mask.sum(-1)
    if objective.sampling_logprob and outcomes is not None:  # uni_opd: l_old is the sampling policy, these weights
        sampled = student_logp.detach().gather(-1, ids[:, None]).squeeze(-1)
        outcomes = replace(outcomes, student_logprob=sampled, target_logprob=token_logprob[objective.routes[0].target])
    plan = plan_tokens(objective, lengths, signals, thresholds, prune_keys, groups, num_sequences, num_tokens, outcomes)
    if plan.target_shift is not None:  # uni_opd's margin: a shift of the target's token log-prob (its reward)
        target = objective.routes[0].target
        token_logprob = {**token_logprob, target: shifted_target(token_logprob[target], plan.target_shift)}

    token_loss = torch.zeros(ids.shape, dtype=student_logp.dtype, device=mask.device)
    for r, spec in enumerate(objective.routes):
        if spec is None:
            continue
        d = route_divergence(
            spec, c, student_logp, target_logp[spec.target], ids, {v: token_logprob[v] for v in spec.views}
        )
        token_loss = torch.where(plan.route == r, d, token_loss)
    loss = (token_loss * plan.weight.to(token_loss.dtype)).sum()

    def grid(values: Tensor, fill) -> Tensor:  # [N] -> [B, T] for the caller, `fill` where masked
        return torch.full(mask.shape, fill, dtype=values.dtype, device=mask.device).masked_scatter(mask, values)

    route = grid(plan.route, -1)
    regime = grid(plan.regime, -1) if plan.regime is not None else route
    token_loss = grid(token_loss.detach(), 0)
    return LossOutput(loss=loss, token_loss=token_loss, regime=regime, route=route, thresholds=thresholds)


def dopd_loss(
    student_logits: Tensor,
    teacher_priv_logits: Tensor,
    student_priv_logits: Tensor,
    response_ids: Tensor,
    mask: Tensor,
    config: ObjectiveConfig | None = None,
    *,
    thresholds: dict[str, float] | None = None,
    num_sequences: int | None = None,
    num_tokens: int | None = None,
) -> LossOutput:
    """DOPD over given logits [B, T, V] (docs/design.md §5): `objective_loss` with DOPD's objective.

    Args:
        student_logits: [B, T, V] the student's logits on the plain view, with gradient.
        teacher_priv_logits: [B, T, V] the teacher's, given the privileged context.
        student_priv_logits: [B, T, V] the privileged student's.
        response_ids: [B, T] the sampled tokens (position t predicts response_ids[:, t]).
        mask: [B, T] valid response tokens.
        config: the objective section; None: the paper's defaults. Its name must be `dopd`.
        thresholds: routing thresholds; None: this batch's own.
        num_sequences: the step's sequence count for the normalisation; None: this batch's.
        num_tokens: the step's valid-token count; None: this batch's.

    Returns:
        LossOutput: loss, per-token loss, regime, route and thresholds.

    Raises:
        ValueError: `config` names another objective (use `objective_loss`), or the logits'
            shapes or vocabularies differ.
    """
    config = config or ObjectiveConfig()
    if config.name != "dopd":
        raise ValueError(f"dopd_loss computes the 'dopd' objective; use objective_loss for {config.name!r}")
    return objective_loss(
        build_objective(config),
        student_logits,
        {"teacher_priv": teacher_priv_logits, "student_priv": student_priv_logits.detach()},
        response_ids,
        mask,
        thresholds=thresholds,
        num_sequences=num_sequences,
        num_tokens=num_tokens,
    )


def _checked_vocab(logits: dict[str, Tensor], vocab_size: int | None) -> int:
    sizes = {name: t.shape[-1] for name, t in logits.items()}
    if vocab_size is None:
        if len(set(sizes.values())) != 1:
            raise ValueError(
                f"logits have different vocabulary sizes {sizes}; pass vocab_size (the tokenizer's size) "
                "so that padded lm-head rows are dropped"
            )
        return next(iter(sizes.values()))
    too_small = {k: v for k, v in sizes.items() if v < vocab_size}
    if too_small:
        raise ValueError(
            f"logits {too_small} have fewer entries than the tokenizer's {vocab_size}: models do not share a tokenizer"
        )
    return vocab_size
