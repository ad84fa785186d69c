"""Scoring the target views without gradient, keeping only what the loss needs (docs/design.md §2).

For each scoring view: final hidden states at the valid response tokens ([N, H], no logits) and
the sampled tokens' log-probs ([N], computed chunk by chunk over the vocabulary).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dopd_vl.models import output_embedding_weight
from dopd_vl.loss import TargetStates, target_states
from dopd_vl.modality import TEACHER_VIEWS
from dopd_vl.parallel import call_model
from dopd_vl.views import ViewBatch, response_hidden_states

__all__ = ["valid_response_states", "score_views"]


def valid_response_states(model: nn.Module, batch: ViewBatch) -> tuple[Tensor, Tensor]:
    """Hidden states and ids of the valid response tokens, flattened in (sequence, position) order."""
    hidden = response_hidden_states(model, batch)
    return hidden[batch.response_mask], batch.response_ids[batch.response_mask]


@torch.no_grad()
def score_views(
    batches: dict[str, ViewBatch],
    teacher: nn.Module,
    privileged_student: nn.Module | None,
    vocab_size: int,
    chunk_size: int = 256,
    reference: nn.Module | None = None,
    entropy_views: set[str] | None = None,
    logprob_views: set[str] | None = None,
) -> dict[str, TargetStates]:
    """TargetStates of every scoring view in `batches` (teacher views by the teacher, student_priv by
    the privileged student: the live student in eval mode, a frozen copy or an EMA; `reference`
    by the reference model, ExOPD's initial student). Entropies only for `entropy_views`, sampled-token
    log-probs only for `logprob_views` (None: every view). A sharded model (a `ModelCall` under FSDP)
    is run through its wrapper, which gathers its output embedding for the step (dopd_vl/parallel.py)."""
    states = {}
    for name, batch in batches.items():
        if name == "student":
            continue
        model = teacher if name in TEACHER_VIEWS else reference if name == "reference" else privileged_student
        if model is None:
            raise ValueError(f"view {name!r} needs a model to score it, but none was given")
        hidden, ids, head = call_model(model, lambda m: (*valid_response_states(m, batch), output_embedding_weight(m)))
        with_entropy = entropy_views is None or name in entropy_views
        with_logprob = logprob_views is None or name in logprob_views
        states[name] = target_states(hidden, head, ids, vocab_size, chunk_size, with_entropy, with_logprob)
    return states
