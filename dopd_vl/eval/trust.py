"""Who is right where DOPD routes (`dopd diagnose`'s `answers`, docs/design.md §1.11): the greedy
accuracy of the student and of both teacher views on the sampled prompts, and the HS share of the
tokens in the student's right vs wrong sampled responses. HS routes a token away from the teacher;
the rule pays only if that happens where the student is right and the teacher is not."""

from __future__ import annotations

import torch
from torch import Tensor

from dopd_vl.data.answers import is_correct
from dopd_vl.eval.evaluate import EvalConfig, generate_answers
from dopd_vl.method.routing import Regime
from dopd_vl.models.parallel import generate_with_full_weights, is_sharded

__all__ = ["token_correct", "trust_answers"]


def token_correct(trainer, mb, scored) -> Tensor:
    """1.0 / 0.0 per valid response token: whether its sampled response answers its record correctly."""
    right = [
        float(is_correct(trainer.tokenizer.decode(response, skip_special_tokens=True).strip(), mb.records[i]["answer"]))
        for i, response in zip(mb.rollout.record_index, mb.rollout.responses)
    ]
    counts = scored.student_view.response_mask.sum(-1).cpu()
    return torch.repeat_interleave(torch.tensor(right, dtype=torch.float64), counts).to(trainer.device)


def trust_answers(trainer, records: list[dict], regime: Tensor, correct: Tensor) -> dict:
    """Who is right on the sampled prompts (greedy answers of the student, the privileged and the
    plain teacher), and the paper-rule HS share of tokens in the student's right vs wrong sampled
    responses: is HS where the student is right and the teacher is not? Counts sum over processes."""
    m, c = trainer.models, trainer.config

    def right(model, adapter, privileged: bool) -> float:
        config = EvalConfig(max_new_tokens=c.rollout.max_new_tokens, privileged=privileged)
        answers = generate_answers(model, adapter, records, config, m.eos_token_ids, m.suppress_ids)
        return float(sum(is_correct(a, r["answer"]) for a, r in zip(answers, records)))

    def with_teacher(fn):
        return generate_with_full_weights(m.teacher, fn) if is_sharded(m.teacher) else fn(m.teacher)

    counts = [
        m.with_full_student(lambda model: right(model, trainer.adapters["student"], False)),
        with_teacher(lambda model: right(model, trainer.adapters["teacher"], True)),
        with_teacher(lambda model: right(model, trainer.adapters["teacher"], False)),
        float(len(records)),
    ]
    student, teacher_priv, teacher_plain, n = trainer.reduce_sum(torch.tensor(counts, dtype=torch.float64)).tolist()
    hs = regime == int(Regime.HS)
    correct = correct == 1

    def hs_share(tokens: Tensor) -> float | None:
        return float(hs[tokens].double().mean()) if bool(tokens.any()) else None

    return {
        "student_accuracy": student / n,
        "teacher_priv_accuracy": teacher_priv / n,
        "teacher_plain_accuracy": teacher_plain / n,
        "hs_share_correct": hs_share(correct),
        "hs_share_wrong": hs_share(~correct),
        "n": int(n),
    }
