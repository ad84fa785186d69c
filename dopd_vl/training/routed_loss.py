"""The routed loss of one run as the trainer calls it (docs/design.md §4.4): built once in setup,
called on the student inside its wrapper's forward, so DDP / FSDP hooks run around every use.

It glues a model to the loss layer: the student's final hidden states at the response positions
and its output embedding go into `chunked_objective_loss` (dopd_vl/loss/chunked.py); no
[tokens, vocab] logits are ever held for more than one chunk.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from dopd_vl.loss.chunked import ChunkedLossOutput, TargetStates, chunked_objective_loss, chunked_token_logprobs
from dopd_vl.method.objectives import Objective
from dopd_vl.method.plan import TokenPlan
from dopd_vl.modality.batches import ViewBatch, valid_response_states
from dopd_vl.models.loading import output_embedding_weight

__all__ = ["RoutedLoss"]


@dataclass(frozen=True)
class RoutedLoss:
    """`loss(model, view, plan=..., targets=...)`: the routed loss of the student `model` over a
    micro-batch's valid tokens, each on its plan's route with its plan's weight (its share of the
    step's loss, §1.6).

    Passed as the function of a `ModelCall` (`student_call(loss, view, ...)`), so the model it gets
    is the one inside the DDP / FSDP wrapper.
    """

    objective: Objective
    vocab_size: int
    chunk_size: int
    backend: str = "torch"

    def __call__(
        self,
        model: nn.Module,
        view: ViewBatch,
        *,
        plan: TokenPlan,
        targets: dict[str, TargetStates],
        with_logprob: bool = False,
    ) -> ChunkedLossOutput:
        """`with_logprob`: also the student's log p of each sampled token (detached), for the
        rollout engine's mismatch metric: one more chunked pass over the head, no extra forward.
        Normalised over every head row, as vLLM's raw log-probs are (like with like)."""
        hidden, ids = valid_response_states(model, view)
        out = chunked_objective_loss(
            self.objective,
            hidden,
            output_embedding_weight(model),
            ids,
            plan.route,
            plan.weight,
            targets,
            self.vocab_size,
            self.chunk_size,
            self.backend,
            target_shift=plan.target_shift,
        )
        if with_logprob:
            with torch.no_grad():
                weight = output_embedding_weight(model).detach()
                logprob, _ = chunked_token_logprobs(
                    hidden.detach(), weight, ids, weight.shape[0], self.chunk_size, with_entropy=False
                )
            out = dataclasses.replace(out, student_logprob=logprob)
        return out
