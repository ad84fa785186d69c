"""The trust study's first-step readout: who is right on each routed token, and what each regime
does to the gradient. No training: every number comes from the first step's rollouts (the same
in every method's run of a seed) through the package's step functions and `Trainer.train_step(update=False)`.

Token labels. A sampled token is *on track* when its prefix equals the reference solution's
(`meta.solution`, the true one) up to it; there the reference next token is known. The student is
right when it sampled that token; the privileged teacher is right when its argmax (with the
context) is that token. Off-track tokens (after a first deviation) have no reference and are
left out of the label shares (their share is reported).

Gradients. The step's gradient of each objective in READOUT_VARIANTS (one per regime: DOPD with
the other three routes disabled; their sum is DOPD's gradient, a check reported as
`regime_sum_error`), with per-regime norms, each one's cosine with vanilla OPD's gradient, and
|∇JS| / |∇RKL| on HT tokens (HT's route with full-vocabulary reverse KL instead of JS).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from examples.toy_privilege import harness as toy

REGIMES = ("LH", "LL", "HT", "HS")


def _only(regime: str, **route) -> str:
    """DOPD's regime_routes override leaving only `regime` on (optionally with other route keys)."""
    parts = [f"{r}: {{enabled: false}}" for r in REGIMES if r != regime]
    if route:
        parts.append(f"{regime}: {{" + ", ".join(f"{k}: {v}" for k, v in route.items()) + "}")
    return "objective.regime_routes={" + ", ".join(parts) + "}"


READOUT_VARIANTS = {
    "vanilla": "vanilla_opd",
    "dopd": "dopd",
    **{regime: f"dopd;{_only(regime)}" for regime in REGIMES},
    "HT_rkl": f"dopd;{_only('HT', divergence='rkl')}",
}
"""Name -> METHOD;override...: the objectives whose first-step gradients the readout reads."""


def first_step(out: Path, spec: str, seed: int, prepared: toy.Prepared, task: toy.Task, device: str = "cpu"):
    """The run of METHOD;overrides on the seed's models, its first step's rollouts and gradient
    (`train_step(update=False)`), as (run, micro_batches, grad)."""
    from dopd_vl import Trainer, sample_step, setup_run

    config = toy.distill_config(f"readout={spec};diagnostics=false", seed, prepared, out, 1, task, device)
    run = setup_run(config)
    micro_batches = sample_step(run, 0)
    Trainer(run).train_step(micro_batches, update=False)
    params = [p for p in run.models.student.parameters() if p.requires_grad]
    grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double() for p in params])
    return run, micro_batches, grad


def token_labels(run, micro_batches, target: str = "meta.solution") -> dict[str, torch.Tensor]:
    """Over the step's valid response tokens, flattened in (micro-batch, sequence, position)
    order: on_track, student_right (the sampled token is the reference's next), teacher_right
    (the privileged teacher's argmax is) and response_right (its response answers the record
    correctly), each 0/1."""
    from dopd_vl import answer_ids, build_view, is_correct, output_embedding_weight, response_hidden_states

    tokenizer, teacher = run.tokenizer, run.models.teacher
    columns: dict[str, list[float]] = {"on_track": [], "student_right": [], "teacher_right": [], "response_right": []}
    for mb in micro_batches:
        records = [mb.records[i] for i in mb.rollout.record_index]
        view = build_view(run.data.adapters["teacher"], "teacher_priv", records, mb.rollout.responses).to(
            next(teacher.parameters()).device
        )
        with torch.no_grad():
            hidden = response_hidden_states(teacher, view)
            argmax = (hidden @ output_embedding_weight(teacher)[: len(tokenizer)].T).argmax(-1).cpu()
        for b, (record, response) in enumerate(zip(records, mb.rollout.responses)):
            reference = answer_ids(tokenizer, record, target).tolist()
            sampled = response.tolist()
            answered = is_correct(tokenizer.decode(response, skip_special_tokens=True).strip(), record["answer"])
            columns["response_right"].extend([float(answered)] * len(sampled))
            for t, token in enumerate(sampled):
                on_track = sampled[:t] == reference[:t] and t < len(reference)
                columns["on_track"].append(float(on_track))
                columns["student_right"].append(float(on_track and token == reference[t]))
                columns["teacher_right"].append(float(on_track and int(argmax[b, t]) == reference[t]))
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in columns.items()}


def step_regimes(run, micro_batches) -> torch.Tensor:
    """The paper-rule regime of each valid token of the first step, same order as `token_labels`."""
    from dopd_vl import plan_micro_batch, score_micro_batch, step_statistics, step_totals

    scored = [score_micro_batch(run, mb, 0) for mb in micro_batches]
    stats, totals = step_statistics(run, scored), step_totals(run, scored)
    return torch.cat([plan_micro_batch(run, s, stats, totals).regime.cpu() for s in scored])


def label_shares(regime: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict:
    """HS precision (share of on-track HS tokens where the student is right and the teacher
    wrong), the share of on-track HT tokens where the student is wrong, and the base rates."""
    on = labels["on_track"] == 1
    right, teacher_right = labels["student_right"] == 1, labels["teacher_right"] == 1
    student_over_teacher = on & right & ~teacher_right

    def share(numerator: torch.Tensor, among: torch.Tensor) -> float | None:
        return float(numerator[among].double().mean()) if bool(among.any()) else None

    hs, ht = on & (regime == REGIMES.index("HS")), on & (regime == REGIMES.index("HT"))
    in_hs, answered = regime == REGIMES.index("HS"), labels["response_right"] == 1
    return {
        "tokens": int(regime.numel()),
        "on_track": float(on.double().mean()),
        **{f"frac/{r}": float((regime == i).double().mean()) for i, r in enumerate(REGIMES)},
        "hs_precision": share(student_over_teacher, hs),
        "hs_on_track": int(hs.sum()),
        "ht_student_wrong": share(~right, ht),
        "ht_on_track": int(ht.sum()),
        "base_student_right_teacher_wrong": share(student_over_teacher, on),
        "teacher_wrong_on_track": share(~teacher_right, on),
        # `dopd diagnose`'s answers.hs_share_correct / _wrong, on the same rollouts
        "hs_share_correct": share(in_hs, answered),
        "hs_share_wrong": share(in_hs, ~answered),
        "response_accuracy": share(answered, torch.ones_like(answered)),
    }


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    norm = float(a.norm() * b.norm())
    return float(a @ b) / norm if norm > 0 else None


def gradient_shares(grads: dict[str, torch.Tensor]) -> dict:
    """Per-regime gradient norms and cosines with vanilla OPD's, DOPD's own cosine, |∇JS|/|∇RKL|
    on HT, and how far the regimes' sum is from DOPD's gradient (relative)."""
    vanilla, dopd = grads["vanilla"], grads["dopd"]
    regime_sum = sum(grads[r] for r in REGIMES)
    ht_rkl = float(grads["HT_rkl"].norm())
    return {
        "grad_norm": {name: float(grads[name].norm()) for name in ("vanilla", "dopd", *REGIMES, "HT_rkl")},
        "cosine_with_vanilla": {name: _cosine(grads[name], vanilla) for name in ("dopd", *REGIMES)},
        "ht_js_over_rkl": float(grads["HT"].norm()) / ht_rkl if ht_rkl > 0 else None,
        "regime_sum_error": float((regime_sum - dopd).norm()) / max(float(dopd.norm()), 1e-300),
    }


def readout(out: Path, seed: int, prepared: toy.Prepared, task: toy.Task, device: str = "cpu") -> dict:
    """The first-step readout of one seed's student with one teacher (`prepared.teacher`)."""
    grads, labels, regime, responses = {}, None, None, None
    for name, spec in READOUT_VARIANTS.items():
        run, micro_batches, grads[name] = first_step(out / name, spec, seed, prepared, task, device)
        ids = [r.tolist() for mb in micro_batches for r in mb.rollout.responses]
        if name == "dopd":  # DOPD's trainer scores the routing signals
            labels, regime = token_labels(run, micro_batches), step_regimes(run, micro_batches)
        if responses is None:  # rollouts are seeded by (seed, step): the same in every variant
            responses = ids
        elif ids != responses:
            raise RuntimeError(f"readout: {name}'s first-step rollouts differ from the others' (seed {seed})")
    result = {**label_shares(regime, labels), **gradient_shares(grads)}
    if not math.isfinite(result["regime_sum_error"]) or result["regime_sum_error"] > 1e-4:
        raise RuntimeError(
            f"readout: the regimes' gradients do not add up to DOPD's ({result['regime_sum_error']:.2e})"
        )
    return result
