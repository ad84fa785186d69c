"""A route's terms (docs/design.md §1.5, §1.6, §1.10): what a token costs on the route it takes.

The objective (dopd_vl/method/objectives.py) says which route a token takes and the token plan
(dopd_vl/method/plan.py) what weight its loss gets; this module says what the route's divergence
terms cost. The reference path (reference.py) and the chunked path (chunked.py, the kernels) call
the same function, so they cannot drift apart.
"""

from __future__ import annotations

from torch import Tensor

from dopd_vl.method.divergences import clipped_policy_loss, token_divergence, upcast
from dopd_vl.method.objectives import ObjectiveConfig, Route

__all__ = ["route_divergence"]


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
        if route.clip is not None:  # Uni-OPD: advantage l_T - l_old, l_old the sampling policy (these weights)
            s_tok = student_logp.gather(-1, token_ids[:, None]).squeeze(-1)
            old = s_tok.detach()
            return route.weight * clipped_policy_loss(s_tok, old, target_token - old, *route.clip)
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
