"""Scoring the target views without gradient, keeping only what the loss needs (docs/design.md §2).

For each scoring view: final hidden states at the valid response tokens ([N, H], no logits) and
the sampled tokens' log-probs ([N], computed chunk by chunk over the vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dopd_vl.loss.chunked import TargetStates, target_states
from dopd_vl.method.routing import TokenSignals
from dopd_vl.method.views import DIAGNOSTIC_VIEWS, TEACHER_VIEWS
from dopd_vl.modality.batches import ViewBatch, build_views, response_hidden_states
from dopd_vl.models.loading import output_embedding_weight
from dopd_vl.models.parallel import call_model

__all__ = ["ScoredBatch", "valid_response_states", "score_views", "score_targets", "score_micro_batch"]


@dataclass
class ScoredBatch:
    """A micro-batch after scoring: the student's view, the target views' states and the signals."""

    student_view: ViewBatch
    targets: dict[str, TargetStates]
    signals: TokenSignals | None  # over the valid tokens, flattened
    prune_keys: Tensor | None
    groups: Tensor  # [B] the prompt (record) index of each response: VA-OPD's rollout groups


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
    is run through its wrapper, which gathers its output embedding for the step (dopd_vl/models/parallel.py)."""
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


def score_targets(
    models, views: dict[str, ViewBatch], entropy_views: set[str] | None = None, logprob_views: set[str] | None = None
) -> dict[str, TargetStates]:
    """TargetStates of a micro-batch's scoring views with the run's models (`RunModels`): the
    teacher, the privileged student (live in eval mode, a frozen copy, an EMA, or under LoRA the
    base weights) and the reference. Log-probs and entropies cost a pass over [tokens, V], so only
    for the views something reads them from (None: every view)."""
    was_training = models.student.training
    models.student.eval()
    scored = {k: v for k, v in views.items() if k not in ("student", "reference")}
    with models.base_weights("student_priv"):
        targets = score_views(
            scored,
            models.teacher,
            models.scorer("student_priv"),
            models.vocab_size,
            entropy_views=entropy_views,
            logprob_views=logprob_views,
        )
    if "reference" in views:  # the initial student: a frozen copy, or the base weights under LoRA
        with models.base_weights("reference"):
            targets.update(
                score_views(
                    {"reference": views["reference"]},
                    None,
                    None,
                    models.vocab_size,
                    reference=models.scorer("reference"),
                    entropy_views=entropy_views,
                    logprob_views=logprob_views,
                )
            )
    models.student.train(was_training)
    return targets


def score_micro_batch(models, adapters, objective, config, mb, scored_views, step: int, device) -> ScoredBatch:
    """Build the views an objective needs for a micro-batch of rollouts, score the target views
    without gradient (log-probs and entropies only where something reads them) and compute the
    routing signals (and pruned_opd's seeded keys)."""
    records = [mb.records[i] for i in mb.rollout.record_index]
    views = build_views(adapters, ("student", *scored_views), records, mb.rollout.responses)
    views = {k: v.to(device) for k, v in views.items()}
    entropy_views = {"teacher_priv", *objective.entropy_views}
    logprob_views = {*objective.logprob_views, *(DIAGNOSTIC_VIEWS if config.diagnostics else ())}
    targets = score_targets(models, views, entropy_views, logprob_views)
    token_logprob = {v: t.token_logprob for v, t in targets.items()}
    signals = objective.token_signals(token_logprob, {v: t.entropy for v, t in targets.items()})
    prune_keys = None
    if signals is not None and objective.router == "prune":
        generator = torch.Generator().manual_seed(config.objective.prune_seed * 1_000_003 + step)
        prune_keys = objective.prune_keys(signals, generator)
    groups = torch.as_tensor(mb.rollout.record_index, dtype=torch.long, device=device)
    return ScoredBatch(views["student"], targets, signals, prune_keys, groups)
