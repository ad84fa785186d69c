"""Divergences between the student distribution s and a target t (docs/design.md §1.5).

One definition of each quantity, used by the reference path and the chunked path alike:

* `kl` is the only KL formula; reverse KL, forward KL and JS(beta) are built from it.
* A support is a way of coarsening both distributions before the divergence: `full` keeps the
  vocabulary, `topk` keeps K cells (+ a tail bucket), `sampled` is the policy-gradient surrogate.

Everything works on rows of log-probabilities and is computed in fp32 (float64 stays float64,
which the tests use to compare against naive float64 formulas).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "DIVERGENCES",
    "SUPPORTS",
    "upcast",
    "entropy",
    "kl",
    "reverse_kl",
    "forward_kl",
    "js",
    "divergence",
    "topk_cells",
    "sampled_reverse_kl",
    "clipped_policy_loss",
    "token_divergence",
]

DIVERGENCES = ("rkl", "fkl", "js")
SUPPORTS = ("full", "topk", "sampled")


def upcast(x: Tensor) -> Tensor:
    """fp32 for half types, float64 kept as is."""
    return x if x.dtype == torch.float64 else x.float()


def entropy(logp: Tensor) -> Tensor:
    """H(p) = -sum_v p_v log p_v over the last dim, from log-probabilities."""
    return -(logp.exp() * logp).sum(-1)


def kl(p_logp: Tensor, q_logp: Tensor) -> Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) over the last dim; cells with p_v = 0 add 0.

    The `where` keeps -inf - -inf (an empty tail cell) from producing nan in value or gradient.
    """
    p = p_logp.exp()
    log_ratio = torch.where(p > 0, p_logp - q_logp, torch.zeros_like(p_logp))
    return (p * log_ratio).sum(-1)


def reverse_kl(student_logp: Tensor, target_logp: Tensor) -> Tensor:
    """RKL(s || t): mode-seeking, the student's own mass is what is penalised."""
    return kl(student_logp, target_logp)


def forward_kl(student_logp: Tensor, target_logp: Tensor) -> Tensor:
    """FKL = KL(t || s)."""
    return kl(target_logp, student_logp)


def js(student_logp: Tensor, target_logp: Tensor, beta: float = 0.5) -> Tensor:
    """JS(beta) = beta*KL(t||m) + (1-beta)*KL(s||m), m = beta*t + (1-beta)*s, log m by logsumexp."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"js beta must be in (0, 1), got {beta}")
    log_m = torch.logaddexp(target_logp + math.log(beta), student_logp + math.log(1.0 - beta))
    return beta * kl(target_logp, log_m) + (1.0 - beta) * kl(student_logp, log_m)


def divergence(name: str, student_logp: Tensor, target_logp: Tensor, js_beta: float = 0.5) -> Tensor:
    """Dispatch by name over the divergences of DIVERGENCES."""
    if name == "rkl":
        return reverse_kl(student_logp, target_logp)
    if name == "fkl":
        return forward_kl(student_logp, target_logp)
    if name == "js":
        return js(student_logp, target_logp, js_beta)
    raise ValueError(f"unknown divergence {name!r}; expected one of {DIVERGENCES}")


def topk_cells(
    student_logp: Tensor,
    target_logp: Tensor,
    k: int,
    source: str = "student",
    tail: bool = True,
) -> tuple[Tensor, Tensor]:
    """Coarsen both [n, V] distributions to the K cells of I (+ tail bucket) [ours].

    I holds the K largest entries of the student (or target, `source="target"`), chosen without
    gradient. With `tail`, cell K is the remaining mass, computed as a logsumexp over the
    complement of I (never 1 - sum, which underflows for confident distributions). Without it,
    both are renormalised over I. With K >= V the cells are the full vocabulary.
    """
    if source not in ("student", "target"):
        raise ValueError(f"topk_source must be 'student' or 'target', got {source!r}")
    vocab = student_logp.shape[-1]
    ranking = student_logp if source == "student" else target_logp
    k_eff = min(k, vocab)
    index = ranking.detach().topk(k_eff, dim=-1).indices
    s_top = student_logp.gather(-1, index)
    t_top = target_logp.gather(-1, index)
    if not tail:
        return s_top - s_top.logsumexp(-1, keepdim=True), t_top - t_top.logsumexp(-1, keepdim=True)
    if k_eff == vocab:  # the complement is empty: no tail cell to add
        return s_top, t_top
    in_top = torch.zeros_like(student_logp, dtype=torch.bool).scatter_(-1, index, True)
    s_tail = student_logp.masked_fill(in_top, float("-inf")).logsumexp(-1, keepdim=True)
    t_tail = target_logp.masked_fill(in_top, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat([s_top, s_tail], -1), torch.cat([t_top, t_tail], -1)


def sampled_reverse_kl(student_token_logp: Tensor, target_token_logp: Tensor) -> Tensor:
    """Per-token policy-gradient form of RKL (vanilla OPD): sg(log s(y) - log t(y)) * log s(y)."""
    return (student_token_logp - target_token_logp).detach() * student_token_logp


def clipped_policy_loss(logprob: Tensor, old_logprob: Tensor, advantage: Tensor, eps: float, eps_high: float) -> Tensor:
    """PPO's clipped surrogate per token (Uni-OPD's loss): -min(rho A, clip(rho, 1 - eps, 1 + eps_high) A),
    rho = exp(logprob - old_logprob). At rho = 1 its gradient is -A grad(logprob), the sampled RKL's
    when A = log t(y) - log s(y)."""
    ratio = (logprob - old_logprob.detach()).exp()
    advantage = advantage.detach()
    return -torch.minimum(ratio * advantage, ratio.clamp(1.0 - eps, 1.0 + eps_high) * advantage)


def token_divergence(
    name: str,
    support: str,
    student_logp: Tensor,
    target_logp: Tensor | None,
    token_ids: Tensor,
    *,
    target_token_logp: Tensor | None = None,
    top_k: int = 128,
    topk_source: str = "student",
    topk_tail: bool = True,
    js_beta: float = 0.5,
) -> Tensor:
    """Per-token divergence of rows of full log-probs [n, V] under one support.

    Args:
        name: `rkl`, `fkl` or `js`.
        support: `full` (the whole vocabulary), `topk` (the K largest entries of `topk_source`, plus
            the tail mass as one cell unless `topk_tail` is false) or `sampled` (the sampled token's
            log-ratio, RKL only).
        student_logp: [n, V] student log-probs.
        target_logp: [n, V] target log-probs; may be None for `sampled` when `target_token_logp` is given.
        token_ids: [n] the sampled tokens.
        target_token_logp: [n] the target's sampled-token log-probs (the chunked path keeps them from
            scoring), for `sampled`.
        top_k: K of the top-K support.
        topk_source: whose K largest entries form the support, `student` or `target`.
        topk_tail: keep the remaining mass as a (K+1)-th cell.
        js_beta: the mixture weight of JS(beta).

    Returns:
        [n] divergence per token.
    """
    if support == "full":
        return divergence(name, student_logp, target_logp, js_beta)
    if support == "topk":
        s_cells, t_cells = topk_cells(student_logp, target_logp, top_k, topk_source, topk_tail)
        return divergence(name, s_cells, t_cells, js_beta)
    if support == "sampled":
        if name != "rkl":
            raise ValueError(f"support 'sampled' is defined for 'rkl' only, got {name!r}")
        s_tok = student_logp.gather(-1, token_ids[:, None]).squeeze(-1)
        if target_token_logp is None:
            target_token_logp = target_logp.gather(-1, token_ids[:, None]).squeeze(-1)
        return sampled_reverse_kl(s_tok, target_token_logp)
    raise ValueError(f"unknown support {support!r}; expected one of {SUPPORTS}")
