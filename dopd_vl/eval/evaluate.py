"""Evaluating a student: greedy answers and accuracy per question type (`dopd eval`), and the
mean per-token reverse KL to a teacher on the student's own samples (how far distillation got).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dopd_vl.data.answers import answer_kind, is_correct
from dopd_vl.loss import chunk_logits
from dopd_vl.method.divergences import reverse_kl
from dopd_vl.modality.batches import build_views, valid_response_states
from dopd_vl.models.loading import output_embedding_weight
from dopd_vl.progress import progress_bar
from dopd_vl.training.rollout import RolloutConfig, sample_responses

logger = logging.getLogger(__name__)

__all__ = ["EvalConfig", "generate_answers", "accuracy_report", "reverse_kl_to_teacher"]


@dataclass
class EvalConfig:
    max_new_tokens: int = 32
    batch_size: int = 8
    privileged: bool = False
    """Answer on the privileged view (the prompt plus the record's privileged context)."""


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    adapter,
    records: list[dict],
    config: EvalConfig,
    eos_token_ids: list[int],
    suppress_token_ids=None,
    engine=None,
) -> list[str]:
    """Greedy answers, one per record (temperature 0 through `sample_responses`' greedy mode), or
    from a rollout `engine` (a `VllmEngine`, dopd_vl/training/engines.py) when one is given."""
    view = "student_priv" if config.privileged else "student"
    rollout = RolloutConfig(num_generations=1, max_new_tokens=config.max_new_tokens, temperature=0.0)
    answers = []
    for start in progress_bar(
        range(0, len(records), config.batch_size), desc="eval", leave=False, disable=len(records) <= config.batch_size
    ):
        batch = records[start : start + config.batch_size]
        if engine is not None:
            out = engine.sample(None, adapter, batch, rollout, view=view)
        else:
            out = sample_responses(model, adapter, batch, rollout, eos_token_ids, suppress_token_ids, view=view)
        answers += [adapter.tokenizer.decode(r, skip_special_tokens=True).strip() for r in out.responses]
    return answers


def accuracy_report(records: list[dict], answers: list[str]) -> dict:
    """Accuracy overall and per question type (`meta.question_type`, else the answer's kind)."""
    per_type: dict[str, list[bool]] = defaultdict(list)
    rows = []
    for record, answer in zip(records, answers):
        if record.get("answer") is None:
            continue
        qtype = str((record.get("meta") or {}).get("question_type") or answer_kind(str(record["answer"])))
        ok = is_correct(answer, str(record["answer"]))
        per_type[qtype].append(ok)
        rows.append(
            {"id": record.get("id"), "type": qtype, "answer": record["answer"], "response": answer, "correct": ok}
        )
    n = sum(len(v) for v in per_type.values())
    return {
        "accuracy": sum(sum(v) for v in per_type.values()) / n if n else None,
        "count": n,
        "per_type": {t: {"accuracy": sum(v) / len(v), "count": len(v)} for t, v in sorted(per_type.items())},
        "responses": rows,
    }


@torch.no_grad()
def reverse_kl_to_teacher(
    student: nn.Module,
    teacher: nn.Module,
    adapters: dict[str, object],
    records: list[dict],
    rollout: RolloutConfig,
    eos_token_ids: list[int],
    vocab_size: int,
    teacher_view: str = "teacher_plain",
    seed: int = 0,
    suppress_token_ids=None,
) -> float:
    """Mean over the student's sampled response tokens of KL(student || teacher), full vocabulary.

    The student answers on the plain view; the teacher scores the same tokens on `teacher_view`.
    Sampling is seeded, so two students compared on the same records see comparable prompts."""
    was_training = student.training
    student.eval()
    torch.manual_seed(seed)
    samples = sample_responses(student, adapters["student"], records, rollout, eos_token_ids, suppress_token_ids)
    batch_records = [records[i] for i in samples.record_index]
    views = build_views(adapters, ("student", teacher_view), batch_records, samples.responses)
    device = next(student.parameters()).device
    total, count = 0.0, 0
    s_hidden, _ = valid_response_states(student, views["student"].to(device))
    t_hidden, _ = valid_response_states(teacher, views[teacher_view].to(next(teacher.parameters()).device))
    for start in range(0, s_hidden.shape[0], 256):  # chunks: never [all tokens, vocab] at once
        s_logp = chunk_logits(s_hidden[start : start + 256], output_embedding_weight(student), vocab_size).log_softmax(
            -1
        )
        t_logp = chunk_logits(
            t_hidden[start : start + 256].to(device), output_embedding_weight(teacher).to(device), vocab_size
        ).log_softmax(-1)
        value: Tensor = reverse_kl(s_logp, t_logp)
        total += float(value.double().sum())
        count += value.numel()
    student.train(was_training)
    return total / max(count, 1)
