"""The routed loss (docs/design.md §1.5, §1.6, §2): one route table, two paths that compute the same loss.

* `reference`: `objective_loss` / `dopd_loss` over full [B, T, V] logits, readable and exact.
* `chunked`: `chunked_objective_loss`, what the trainer runs, from hidden states in token chunks,
  with the torch backend (autograd per chunk) or the fused Triton kernels (`kernels`).

What the routes are (targets, divergences, supports, weights) is the objective's
(dopd_vl/method/objectives.py); which route each token takes and its weight is the token plan
(dopd_vl/method/plan.py); what a route costs is `route_terms`, which both paths call; the
divergences themselves are dopd_vl/method/divergences.py. This package imports only the method
layer: it takes tensors and returns tensors.
"""

from dopd_vl.loss.chunked import (
    ChunkedLossOutput,
    TargetStates,
    auto_chunk_size,
    chunk_logits,
    chunked_objective_loss,
    chunked_token_logprobs,
    target_states,
)
from dopd_vl.loss.kernels import resolve_loss_backend
from dopd_vl.loss.reference import LossOutput, dopd_loss, objective_loss
from dopd_vl.loss.route_terms import route_divergence

__all__ = [
    "route_divergence",
    "LossOutput",
    "objective_loss",
    "dopd_loss",
    "TargetStates",
    "ChunkedLossOutput",
    "chunked_objective_loss",
    "chunked_token_logprobs",
    "target_states",
    "chunk_logits",
    "auto_chunk_size",
    "resolve_loss_backend",
]
