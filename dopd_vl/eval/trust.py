"""Who is right where DOPD routes (`dopd diagnose`'s `answers`, docs/design.md §1.11): the greedy
accuracy of the student and of both teacher views on the sampled prompts, and the HS share of the
tokens in the student's right vs wrong sampled responses. HS routes a token away from the teacher;
the rule pays only if that happens where the student is right and the teacher is not."""

from __future__ import annotations

import statistics

import torch
from torch import Tensor

from dopd_vl.data.verify import verdict
from dopd_vl.distributed import gather_list, reduce_sum
from dopd_vl.eval.evaluate import EvalConfig, generate_answers
from dopd_vl.method.outcomes import Outcomes, trust_routes
from dopd_vl.method.routing import Regime

__all__ = ["mean_std", "token_correct", "trust_answers", "trust_reading", "verified_reading"]


def token_correct(mb, lengths: Tensor) -> Tensor:
    """1.0 / 0.0 per valid response token ([N], `lengths` [B] the valid tokens of each response):
    the verifier's verdict on its sampled response (`MicroBatch.verdicts`; every record has an answer)."""
    right = [float(bool(v)) for v in mb.verdicts]
    return torch.repeat_interleave(torch.tensor(right, dtype=torch.float64), lengths.cpu())


def trust_answers(run, records: list[dict], regime: Tensor, correct: Tensor, token_records: list[str]) -> dict:
    """Who is right on the sampled prompts of a run (`setup_run`), by the run's verifier: greedy
    answers of the student, the privileged and the plain teacher; the paper-rule HS share of tokens
    in the student's right vs wrong sampled responses (is HS where the student is right and the
    teacher is not?); and the share of tokens each `trust: verified` override would move, with the
    privileged teacher's verdicts on these records (docs/design.md §1.12). `token_records`: the
    record id of each token of `regime`. Counts sum over processes."""
    m, c, adapters, verifier = run.models, run.config, run.data.adapters, run.data.verifier

    def verdicts(model, adapter, privileged: bool) -> list[bool]:
        config = EvalConfig(max_new_tokens=c.rollout.max_new_tokens, privileged=privileged)
        answers = generate_answers(model, adapter, records, config, m.eos_token_ids, m.suppress_ids)
        return [bool(verdict(verifier, a, r)) for a, r in zip(answers, records)]

    teacher_priv = m.with_full_teacher(lambda model: verdicts(model, adapters["teacher"], True))
    counts = [
        float(sum(m.with_full_student(lambda model: verdicts(model, adapters["student"], False)))),
        float(sum(teacher_priv)),
        float(sum(m.with_full_teacher(lambda model: verdicts(model, adapters["teacher"], False)))),
        float(len(records)),
    ]
    totals = reduce_sum(run.accelerator, torch.tensor(counts, dtype=torch.float64))
    student, teacher_right, teacher_plain, n = totals.tolist()
    hs = regime == int(Regime.HS)
    right = correct == 1

    def hs_share(tokens: Tensor) -> float | None:
        return float(hs[tokens].double().mean()) if bool(tokens.any()) else None

    # trust: verified on these tokens (each token its own "response": its response's and record's verdicts)
    by_id = dict(gather_list(run.accelerator, [(str(r.get("id")), v) for r, v in zip(records, teacher_priv)]))
    teacher = torch.tensor([int(by_id[i]) if i in by_id else -1 for i in token_records], dtype=torch.long)
    outcomes = Outcomes(response=right.long().cpu(), teacher=teacher)
    _, moved = trust_routes(regime.long().cpu(), torch.ones(regime.numel(), dtype=torch.long), outcomes)
    return {
        "student_accuracy": student / n,
        "teacher_priv_accuracy": teacher_right / n,
        "teacher_plain_accuracy": teacher_plain / n,
        "hs_share_correct": hs_share(right),
        "hs_share_wrong": hs_share(~right),
        "verified_overrides": {k: v / max(regime.numel(), 1) for k, v in moved.items()},
        "n": int(n),
    }


def trust_reading(answers: dict, study: dict) -> list[str]:
    """Compare the diagnosis's `answers` with the trust study's measured cells (`study`: the asset
    assets/trust_study.json): the privileged teacher's lead over the student and the HS shares in
    right vs wrong responses, each said to lie inside or outside what was measured; then each
    method's measured gain over vanilla OPD in the cell nearest by the teacher's lead. No thresholds
    of our own: the user's numbers are placed among the measured ones, nothing more."""
    cells = study["cells"]
    lead = answers["teacher_priv_accuracy"] - answers["student_accuracy"]

    def leads(cell: dict) -> list[float]:
        return [t - s for t, s in zip(cell["teacher_priv_accuracy"], cell["student_accuracy"])]

    lines = [f"What the trust study measured ({study['source']}; {study['scope']}):"]
    measured = [value for cell in cells for value in leads(cell)]
    lines.append(
        f"- The privileged teacher's lead over the student (greedy accuracy, held-out in the study): "
        f"{_range(measured)} measured, per cell "
        + "; ".join(f"{cell['teacher']} teacher {mean_std(leads(cell), signed=True)}" for cell in cells)
        + f". Yours, on the sampled prompts, is {lead:+.3f}: {_placed(lead, measured)}"
    )
    for key, what in (("hs_share_correct", "right"), ("hs_share_wrong", "wrong")):
        measured = [value for cell in cells for value in cell[key] if value is not None]
        yours = answers[key]
        placed = "you have no such responses." if yours is None else f"yours is {yours:.3f}: {_placed(yours, measured)}"
        lines.append(
            f"- HS share of tokens in the student's {what} responses: {_range(measured, signed=False)} measured, "
            "per cell " + "; ".join(f"{cell['teacher']} {_measured(cell[key])}" for cell in cells) + f"; {placed}"
        )
    precision = "; ".join(f"{cell['teacher']} teacher {_measured(cell['hs_precision'])}" for cell in cells)
    lines.append(
        f"- HS precision measured at the first step (share of on-track HS tokens where the student is right and "
        f"the teacher wrong, against the reference continuation): {precision}."
    )
    nearest = min(cells, key=lambda cell: abs(statistics.fmean(leads(cell)) - lead))
    gains = {
        key: "; ".join(f"{label} {mean_std(nearest[key][label], signed=True)}" for label in nearest[key])
        for key in ("gain_over_vanilla", "carry_gain_over_vanilla")
    }
    lines.append(
        f"- Nearest measured cell by the teacher's lead: the {nearest['teacher']} teacher. Held-out accuracy minus "
        f"vanilla OPD's over {len(nearest['student_accuracy'])} seeds, each method at its dev-chosen lr: "
        f"{gains['gain_over_vanilla']}; on carry problems alone (the blind-spot teacher's blind spot): "
        f"{gains['carry_gain_over_vanilla']}."
    )
    lines.append(f"- {study['caveat']}")
    return lines


def verified_reading(answers: dict, study: dict) -> list[str]:
    """Compare the diagnosis's `answers` with the verified-routing study's cells (`study`: the asset
    assets/verified_study.json): the user's privileged teacher accuracy placed among the measured
    teachers', then, for the measured cell nearest by it, each configuration's held-out accuracy
    minus the better of vanilla OPD and the filtered baseline (per seed), and the study's answer."""
    cells = study["cells"]
    yours = answers["teacher_priv_accuracy"]
    measured = [value for cell in cells for value in cell["teacher_priv_accuracy"]]
    lines = [f"What the verified-routing study measured ({study['source']}; {study['scope']}):"]
    lines.append(
        "- The privileged teacher's accuracy: "
        + "; ".join(f"{cell['name']} {mean_std(cell['teacher_priv_accuracy'])}" for cell in cells)
        + f". Yours, on the sampled prompts, is {yours:.3f}: {_placed(yours, measured)}"
    )
    nearest = min(cells, key=lambda cell: abs(statistics.fmean(cell["teacher_priv_accuracy"]) - yours))
    gains = "; ".join(
        f"{label} {mean_std(values, signed=True)}" for label, values in nearest["gain_over_best_baseline"].items()
    )
    lines.append(
        f"- Nearest measured cell by the teacher's accuracy: {nearest['name']}. Held-out accuracy minus the better of "
        f"vanilla OPD and vanilla OPD on the verified records (per seed, {len(nearest['teacher_priv_accuracy'])} "
        f"seeds): {gains}."
    )
    lines.append(f"- {study['answer']}")
    lines.append(f"- {study['caveat']}")
    return lines


def boxes_reading(answers: dict | None, study: dict) -> list[str]:
    """Quote the boxes-lie study's cells (`study`: the asset assets/boxes_lie_study.json) for a
    grounding dataset whose boxes carry detector scores: per measured noise rate, the share of
    questions the boxes answer wrong, the teacher's accuracy with and without the boxes, and each
    method's held-out accuracy minus vanilla OPD's; with answers, the user's teacher-with-minus-
    without-boxes gap placed among the measured ones. No thresholds of our own."""
    cells = study["cells"]

    def lead(cell: dict) -> list[float]:
        return [p - q for p, q in zip(cell["teacher_priv_accuracy"], cell["teacher_plain_accuracy"])]

    lines = [f"What the boxes-lie study measured ({study['source']}; {study['scope']}):"]
    for cell in cells:
        gains = ", ".join(f"{name} {mean_std(v, signed=True)}" for name, v in cell["gain_over_vanilla"].items())
        lines.append(
            f"- Detector noise rate {cell['rate']:g}: {mean_std(cell['box_wrong_share'])} of the training questions "
            f"answered wrong by the boxes; teacher with the boxes {mean_std(cell['teacher_priv_accuracy'])}, without "
            f"{mean_std(cell['teacher_plain_accuracy'])}; held-out accuracy minus vanilla OPD's: {gains}."
        )
    if answers:
        yours = answers["teacher_priv_accuracy"] - answers["teacher_plain_accuracy"]
        measured = [v for cell in cells for v in lead(cell)]
        nearest = min(cells, key=lambda cell: abs(statistics.fmean(lead(cell)) - yours))
        lines.append(
            f"- Your teacher with the boxes minus without them, on the sampled prompts: {yours:+.3f}; measured "
            f"{_range(measured)}: {_placed(yours, measured)} Nearest measured cell: noise rate {nearest['rate']:g}."
        )
    lines.append(f"- {study['answer']}")
    lines.append(f"- {study['caveat']}")
    return lines


def _measured(values: list[float | None]) -> str:
    """mean ± std over the seeds that had such tokens (None: a seed with none)."""
    present = [v for v in values if v is not None]
    return mean_std(present) if present else "none"


def _range(values: list[float], signed: bool = True) -> str:
    spec = "+.3f" if signed else ".3f"
    return f"{min(values):{spec}} to {max(values):{spec}}"


def _placed(value: float, measured: list[float]) -> str:
    if min(measured) <= value <= max(measured):
        return "inside that range."
    return "outside anything measured: the study says nothing about this case."


def mean_std(values: list[float], signed: bool = False) -> str:
    """'mean ± std' over seeds (the value alone for one seed); `signed` for differences."""
    mean = f"{statistics.fmean(values):+.3f}" if signed else f"{statistics.fmean(values):.3f}"
    return mean if len(values) == 1 else f"{mean} ± {statistics.stdev(values):.3f}"
