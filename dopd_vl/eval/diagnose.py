"""`dopd diagnose`: what DOPD's routing will do on your data, read before any GPU hour (docs/design.md §1.11).

The preflight runs a recipe's first steps without updating anything: the student samples on the
recipe's prompts exactly as training would (same seeds, same batches), every view is scored, and
the per-token signals DOPD routes on are summarised:

* the regime shares under the paper's rule, under the edge check and under the recipe's objective;
* the teacher's **endorsement rate**: the share of sampled tokens with q_T >= q_S, both with the
  context (the HT / HS split of a high-gap token);
* the **information edge** l_T(y|x,p) - l_T(y|x): what the context adds to the teacher on the
  student's tokens (VA-OPD's visual advantage), and the **capability edge** l_T(y|x) - l_S(y|x):
  what the teacher knows better than the student without it. Their sum is the privileged teacher's
  per-token log-ratio to the student, l_T(y|x,p) - l_S(y|x).

The same statistics (`token_diagnostics`, `summarise_diagnostics`) are logged at every training
step with `diagnostics: true` (metrics `diag/*`), and the reading quotes the toy student-strength
study (`assets/strength_study.json`, written from examples/toy_privilege/results/strength) and, where
records carry answers, the trust study (`assets/trust_study.json`, from results/trust).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import textwrap
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from dopd_vl.distributed import gather, gather_list, reduce_sum
from dopd_vl.eval.trust import (
    boxes_reading,
    mean_std,
    token_correct,
    trust_answers,
    trust_reading,
    verified_reading,
)
from dopd_vl.loss.chunked import chunked_token_logprobs
from dopd_vl.method.routing import (
    INFORMATION_EDGE_NATS,
    REGIME_COLORS,
    REGIME_NAMES,
    route_names,
    summarise_diagnostics,
    token_diagnostics,
)
from dopd_vl.method.views import DIAGNOSTIC_VIEWS
from dopd_vl.modality.batches import valid_response_states
from dopd_vl.models.loading import output_embedding_weight
from dopd_vl.progress import progress_bar
from dopd_vl.training.config import TrainConfig, load_config
from dopd_vl.training.rollout import rollout_metrics
from dopd_vl.training.run import setup_run
from dopd_vl.training.step import plan_micro_batch, sample_step, score_micro_batch, step_statistics, step_totals

logger = logging.getLogger(__name__)

__all__ = [
    "terminal_reading",
    "evidence_faults",
    "diagnose",
    "diagnose_run",
    "diagnose_tokens",
    "DiagnosedTokens",
    "reading",
    "measured_study",
    "box_scores",
]


# ------------------------------------------------------------------------------ the preflight
def diagnose(
    config, steps: int = 4, out: str | Path | None = None, overrides: list[str] | None = None, progress: bool = True
) -> dict:
    """Load the recipe's models and data, run `steps` steps of rollouts without updating, score all
    views and return (and, with `out`, write) the diagnosis. `config`: a TrainConfig or a YAML path."""
    if not isinstance(config, TrainConfig):
        config = load_config(config, overrides)
    elif overrides:
        raise ValueError("overrides apply to a recipe path; change the TrainConfig itself instead")
    return diagnose_run(setup_run(dataclasses.replace(config, diagnostics=True)), steps, out, progress)


@dataclasses.dataclass
class DiagnosedTokens:
    """What `diagnose_tokens` read: per-token tensors over the steps (`token_diagnostics`' signals,
    `route`, `teacher_entropy`, `q_teacher_plain`; with answers `correct`), one row per step, the
    rollouts, and, where every record has an answer, each token's record id and the sampled records."""

    pooled: dict[str, Tensor]
    step_rows: list[dict]
    rollouts: list[dict]
    token_records: list[str]
    prompts: dict[str, dict]


@torch.no_grad()
def diagnose_tokens(run, steps: int = 4, progress: bool = True) -> DiagnosedTokens:
    """A built run's (`setup_run`, with `diagnostics: true`) first `steps` steps, sampled and scored
    through the step's own functions (dopd_vl/training/step.py) but never trained on."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    c, objective, a = run.config, run.objective, run.accelerator
    if not c.diagnostics:
        raise ValueError("diagnose_run needs a run built with diagnostics: true (diagnose() sets it)")
    student, tokenizer = run.models.student, run.tokenizer
    names = route_names(objective)
    step_tokens, step_rows, rollouts = [], [], []
    # The trust readout (`answers`) needs every training record to carry an answer.
    answered, prompts, token_records = all("answer" in r for r in run.data.records), {}, []
    for k in progress_bar(range(steps), desc="diagnose", disable=not (progress and a.is_main_process)):
        micro_batches = sample_step(run, k)
        scored = [score_micro_batch(run, mb, k) for mb in micro_batches]
        stats = step_statistics(run, scored)
        totals = step_totals(run, scored)
        logprob = {
            v: gather(a, torch.cat([s.targets[v].token_logprob for s in scored]).double()) for v in DIAGNOSTIC_VIEWS
        }
        student_logprob = []
        for s in scored:  # the student's own plain view: the capability edge's second term
            hidden, ids = valid_response_states(student, s.student_view)
            weight = output_embedding_weight(student)
            student_logprob.append(chunked_token_logprobs(hidden, weight, ids, run.models.vocab_size)[0].double())
        logprob["student"] = gather(a, torch.cat(student_logprob))
        per_token, thresholds = token_diagnostics(logprob, c.objective.outlier_fraction)
        routes = [plan_micro_batch(run, s, stats, totals).route.double() for s in scored]
        per_token["route"] = gather(a, torch.cat(routes))
        per_token["teacher_entropy"] = gather(
            a, torch.cat([s.targets["teacher_priv"].entropy for s in scored]).double()
        )
        per_token["q_teacher_plain"] = logprob["teacher_plain"].exp()
        if answered:  # each token's response right (1) or wrong (0) by the verifier, and its record
            right = [token_correct(mb, s.lengths).to(run.device) for mb, s in zip(micro_batches, scored)]
            per_token["correct"] = gather(a, torch.cat(right))
            ids = [
                str(mb.records[i].get("id"))
                for mb, s in zip(micro_batches, scored)
                for i, n in zip(mb.rollout.record_index, s.lengths.tolist())
                for _ in range(n)
            ]
            token_records += gather_list(a, ids)
            for mb in micro_batches:
                prompts.update({str(mb.records[i].get("id")): mb.records[i] for i in mb.rollout.record_index})
        step_tokens.append(per_token)
        row = {
            "step": k + 1,
            "tokens": int(per_token["regime"].numel()),
            **summarise_diagnostics(per_token),
            **_route_shares(per_token["route"], names),
            "teacher_entropy/mean": float(per_token["teacher_entropy"].mean()),
            **{f"threshold/{key}": value for key, value in thresholds.items()},
            **rollout_metrics(micro_batches, tokenizer, lambda t: reduce_sum(a, t)),
        }
        step_rows.append(row)
        for mb in micro_batches:
            for i, response in zip(mb.rollout.record_index, mb.rollout.responses):
                rollouts.append(
                    {
                        "step": k + 1,
                        "id": str(mb.records[i].get("id")),
                        "response_ids": response.tolist(),
                        "response": tokenizer.decode(response, skip_special_tokens=False),
                    }
                )
    pooled = {key: torch.cat([t[key] for t in step_tokens]) for key in step_tokens[0]}
    return DiagnosedTokens(pooled, step_rows, rollouts, token_records, prompts)


@torch.no_grad()
def diagnose_run(run, steps: int = 4, out: str | Path | None = None, progress: bool = True) -> dict:
    """The diagnosis of a built run (`setup_run`, with `diagnostics: true`): its first `steps` steps
    read by `diagnose_tokens`. Nothing is updated: no backward, no optimizer step; the student's
    weights are fingerprinted before and after."""
    student, c, objective = run.models.student, run.config, run.objective
    before = _fingerprint(student)
    tokens = diagnose_tokens(run, steps, progress)
    pooled, step_rows = tokens.pooled, tokens.step_rows
    names = route_names(objective)
    unchanged = _fingerprint(student) == before
    if not unchanged:  # cannot happen unless a component trains in place; say so loudly
        raise RuntimeError("dopd diagnose changed the student's weights; please report this as a bug")
    result = {
        "recipe": _recipe_summary(c, objective, steps, run),
        "tokens": int(pooled["regime"].numel()),
        "summary": {
            **summarise_diagnostics(pooled),
            **_route_shares(pooled["route"], names),
            "teacher_entropy/mean": float(pooled["teacher_entropy"].mean()),
            **{
                key: statistics.fmean(r[key] for r in step_rows)
                for key in ("response_length", "clipped_frac", "eos_only_frac", "accuracy")
                if key in step_rows[0]
            },
        },
        "steps": step_rows,
        "route_names": list(names),
        "student_weights_unchanged": unchanged,
    }
    scores = box_scores(run.data.records)
    if scores is not None:
        result["box_scores"] = scores
    if tokens.token_records:
        result["answers"] = trust_answers(
            run, list(tokens.prompts.values()), pooled["regime"], pooled["correct"], tokens.token_records
        )
    result["reading"] = reading(result)
    if out is not None and run.accelerator.is_main_process:
        result["files"] = _write(Path(out), result, pooled, step_rows, tokens.rollouts)
    return result


def box_scores(records) -> dict | None:
    """The detector confidences of the training records' privileged boxes (docs/design.md §3.2):
    how many boxes carry one, their quartiles and the share below 0.5; None when no box has a score."""
    values, boxes = [], 0
    for i in range(len(records)):
        privileged = records[i].get("privileged")
        objects = privileged.get("objects") if isinstance(privileged, dict) else None
        for obj in objects if isinstance(objects, list) else []:
            boxes += 1
            if isinstance(obj, dict) and isinstance(obj.get("score"), (int, float)):
                values.append(float(obj["score"]))
    if not values:
        return None
    q = torch.quantile(
        torch.tensor(values, dtype=torch.float64), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    )
    return {
        "boxes": boxes,
        "scored": len(values),
        "quartiles": [round(float(v), 4) for v in q],
        "below_0.5": sum(v < 0.5 for v in values) / len(values),
    }


def _route_shares(route: Tensor, names: tuple[str, ...]) -> dict[str, float]:
    n = max(route.numel(), 1)
    shares = {f"route/{name}": float((route == i).double().sum()) / n for i, name in enumerate(names)}
    dropped = float((route < 0).double().sum()) / n
    if dropped:
        shares["route/dropped"] = dropped
    return shares


def _fingerprint(model) -> tuple[float, ...]:
    return tuple(float(p.detach().double().sum()) for p in model.parameters())


def _recipe_summary(c, objective, steps: int, run) -> dict:
    per_step = c.optim.batch_size * c.optim.gradient_accumulation_steps * run.accelerator.num_processes
    return {
        "student": c.student.name_or_path,
        "teacher": c.teacher.name_or_path,
        "data": c.data.train,
        "objective": objective.name,
        "privileged_student": c.objective.privileged_student,
        "edge_check": c.objective.edge_check,
        "steps": steps,
        "prompts_per_step": per_step,
        "responses_per_step": per_step * c.rollout.num_generations,
        "max_new_tokens": c.rollout.max_new_tokens,
        "seed": c.seed,
        "device": str(run.device),
    }


# ------------------------------------------------------------------------------ the reading
def measured_study(name: str) -> dict | None:
    """A study's measured points, `assets/{name}_study.json`: "strength" (the student-strength study),
    "trust" (the trust study), "verified" (verified routing) or "boxes_lie" (detector boxes that lie).
    None if the asset is missing."""
    try:
        text = resources.files("dopd_vl").joinpath(f"assets/{name}_study.json").read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    return json.loads(text)


def _share_table(title: str, names: list[str], rows: dict[str, list[float | None]]) -> list[str]:
    """The reading's aligned share tables: a header of column names, then one row per label, every
    column as wide as its name (at least 7), labels in a 24-wide column."""
    widths = [max(7, len(name)) for name in names]
    header = f"{title:<24}" + "".join(f"  {name:>{w}}" for name, w in zip(names, widths))
    lines = [header]
    for label, values in rows.items():
        cells = ["" if v is None else f"{v:.3f}" for v in values]
        lines.append(f"  {label:<22}" + "".join(f"  {cell:>{w}}" for cell, w in zip(cells, widths)))
    return lines


MIN_ANSWERED_PROMPTS = 16
"""Fewer answered prompts than this and the accuracies' sampling error (about 0.5/sqrt(n), 0.125 at
16) is as large as the differences between the measured cells: no recommendation [ours]."""
MAX_CUT_SHARE = 0.5
"""At least this share of responses cut at max_new_tokens: the tokens read are not the answers the
run will train on, so the routing figures describe truncated text: no recommendation [ours]."""
READING_WIDTH = 100
"""The reading's lines fit a terminal this wide (`dopd diagnose` wraps them; the JSON keeps them whole)."""


def terminal_reading(lines: list[str], width: int = READING_WIDTH) -> str:
    """The reading wrapped to `width` columns (continuations indented), as `dopd diagnose` prints it."""
    return "\n".join(
        textwrap.fill(line, width, subsequent_indent="    ", break_on_hyphens=False) if line else "" for line in lines
    )


def evidence_faults(result: dict) -> list[str]:
    """Why the sampled answers carry no signal to place among the measured cells (empty: they do):
    most responses cut, every accuracy 0 (or every one 1), too few answered prompts."""
    s, r, answers = result["summary"], result["recipe"], result.get("answers")
    faults = []
    if s["clipped_frac"] >= MAX_CUT_SHARE:
        faults.append(
            f"{s['clipped_frac']:.0%} of the responses were cut at max_new_tokens ({r['max_new_tokens']}): the tokens "
            "read are not the answers the run trains on; raise rollout.max_new_tokens"
        )
    if answers:
        accuracies = [answers[k] for k in ("student_accuracy", "teacher_priv_accuracy", "teacher_plain_accuracy")]
        if len(set(accuracies)) == 1 and accuracies[0] in (0.0, 1.0):
            faults.append(
                f"the student and the teacher with and without the context all answer {accuracies[0]:.0%} of the "
                "prompts right: who is right cannot be told apart; check the answers (dopd eval) and max_new_tokens"
            )
        if answers["n"] < MIN_ANSWERED_PROMPTS:
            faults.append(
                f"{answers['n']} answered prompts, fewer than {MIN_ANSWERED_PROMPTS}: accuracies this noisy do not "
                "separate the measured cells; read more with --steps"
            )
    return faults


def reading(
    result: dict,
    study: dict | None = None,
    trust: dict | None = None,
    verified: dict | None = None,
    boxes: dict | None = None,
) -> list[str]:
    """The plain-text reading: the evidence read, the numbers in aligned columns, then what the
    measured studies (`study`: the strength study, `trust`: the trust study, `verified`: the
    verified-routing study, `boxes`: the boxes-lie study, read for boxes with detector scores;
    default the installed assets) say about such numbers, unless the evidence carries no signal
    (`evidence_faults`)."""
    s, r = result["summary"], result["recipe"]
    answers = result.get("answers")
    prompts = r["steps"] * r.get("prompts_per_step", r["responses_per_step"])
    answered = f", {answers['n']} of them with an answer" if answers else ", none with an answer"
    names = [*REGIME_NAMES]
    routes = [*result["route_names"], *(["dropped"] if "route/dropped" in s else [])]
    lines = [
        f"dopd diagnose: {r['student']} on {r['data']}; teacher {r['teacher']}; objective {r['objective']} "
        f"(privileged student: {r['privileged_student']})",
        f"read: {r['steps']} step(s), {prompts} prompts{answered}, {r['steps'] * r['responses_per_step']} responses, "
        f"{result['tokens']} response tokens",
        *_share_table(
            "regimes (token shares)",
            names,
            {
                "the paper's rule": [s.get(f"frac/{n}") for n in names],
                "with the edge check": [s.get(f"edge_check/frac/{n}") for n in names],
            },
        ),
        *_share_table(f"routes of {r['objective']}", routes, {"token shares": [s.get(f"route/{n}") for n in routes]}),
        f"teacher endorsement (q_T >= q_S, both with the context): {s['endorsement']:.3f} of tokens",
        f"information edge l_T(y|x,p) - l_T(y|x): mean {s['information_edge/mean']:+.3f} nats, "
        f"{s['information_edge/above_1nat']:.3f} of tokens above 1 nat",
        f"capability edge l_T(y|x) - l_S(y|x): mean {s['capability_edge/mean']:+.3f} nats; advantage gap A: mean "
        f"{s['advantage_gap/mean']:.3f}",
        f"responses: mean length {s['response_length']:.1f} tokens, {s['clipped_frac']:.3f} cut at max_new_tokens "
        f"({r['max_new_tokens']}), "
        f"{s['eos_only_frac']:.3f} the end token alone"
        + (f"; rollout accuracy {s['accuracy']:.3f}" if "accuracy" in s else ""),
    ]
    scores = result.get("box_scores")
    if scores:
        lo, q1, median, q3, hi = scores["quartiles"]
        lines.append(
            f"box scores (detector confidence) of {scores['scored']} of {scores['boxes']} privileged boxes: min "
            f"{lo:.2f}, quartiles {q1:.2f} / {median:.2f} / {q3:.2f}, max {hi:.2f}; {scores['below_0.5']:.3f} below 0.5"
            + (
                f"; the teacher with the boxes answers {answers['teacher_priv_accuracy']:.3f}, without them "
                f"{answers['teacher_plain_accuracy']:.3f}"
                if answers
                else ""
            )
        )
    if answers:
        shares = [answers["hs_share_correct"], answers["hs_share_wrong"]]
        right, wrong = ("none" if v is None else f"{v:.3f}" for v in shares)
        lines.append(
            f"answers on the {answers['n']} sampled prompts (greedy): student {answers['student_accuracy']:.3f}, "
            f"privileged teacher {answers['teacher_priv_accuracy']:.3f}, plain teacher "
            f"{answers['teacher_plain_accuracy']:.3f}; HS share of tokens in the student's right responses {right}, "
            f"in its wrong ones {wrong}"
        )
        moved = answers.get("verified_overrides")
        if moved:
            lines.append(
                f"objective.trust: verified would move {moved['trust/teacher_wrong']:.3f} of tokens to HS (records "
                f"whose privileged teacher answers wrong) and {moved['trust/wrong_response']:.3f} to LH (wrong "
                "responses where the teacher is right)"
            )
    faults = evidence_faults(result)
    if faults:
        return (
            lines
            + ["", "No recommendation: what was read carries no signal to compare with the measured studies:"]
            + [f"- {fault}." for fault in faults]
        )
    study = study if study is not None else measured_study("strength")
    if not study:
        return lines + ["(no measured study is installed to compare with)"]
    lines += ["", *_study_reading(result["steps"][0], study)]
    trust = trust if trust is not None else measured_study("trust")
    verified = verified if verified is not None else measured_study("verified")
    boxes = boxes if boxes is not None else (measured_study("boxes_lie") if scores else None)
    detector = ["", *boxes_reading(answers, boxes)] if scores and boxes else []
    if answers and trust:
        lines += ["", *trust_reading(answers, trust)]
        return lines + (["", *verified_reading(answers, verified)] if verified else []) + detector
    if trust:  # the trust study compares who is right, which needs answers
        lines.append(f"- The trust study ({trust['source']}) compares who is right; records with `answer` get it.")
    return lines + detector


def _study_reading(s: dict, study: dict) -> list[str]:
    """Compare the first step's endorsement rate and HT share (`s`: the diagnosis's first step, the
    very step a run starts with) with the study's measured first steps; quote the nearest measured
    cell's DOPD - vanilla accuracy differences and every cell's. No thresholds of our own."""
    cells = study["cells"]
    endorse = [e for cell in cells for e in cell["first_step"]["endorsement"]]
    ht = [h for cell in cells for h in cell["first_step"]["frac/HT"]]
    lines = [f"What the measured study says ({study['source']}; {study['scope']}):"]
    inside = min(endorse) <= s["endorsement"] <= max(endorse)
    lines.append(
        f"- Endorsement rates measured at the first step: {min(endorse):.3f} to {max(endorse):.3f}. Yours, at your "
        f"first step ({s['endorsement']:.3f}), is "
        + (
            "inside that range."
            if inside
            else "outside anything measured: the study says nothing about what DOPD does here."
        )
    )
    lines.append(
        f"- HT shares measured at the first step: {min(ht):.3f} to {max(ht):.3f}. Yours, at your first step "
        f"({s['frac/HT']:.3f}), is "
        + ("inside that range." if min(ht) <= s["frac/HT"] <= max(ht) else "outside that range.")
    )
    nearest = min(cells, key=lambda cell: abs(statistics.fmean(cell["first_step"]["endorsement"]) - s["endorsement"]))
    gains = "; ".join(
        f"{label} {mean_std(nearest['gain_over_vanilla'][key])}" for key, label in study["variants"].items()
    )
    lines.append(
        f"- The measured cell nearest by endorsement is {nearest['task']} / {nearest['strength']} student (endorsement "
        f"{mean_std(nearest['first_step']['endorsement'])}, start at {mean_std(nearest['start_relative'])} of the "
        f"teacher's accuracy): "
        f"held-out accuracy minus vanilla OPD's, over {len(nearest['start_relative'])} seeds: {gains}."
    )
    lines.append(
        "- Every measured cell, by first-step endorsement: "
        + "; ".join(
            f"{cell['task']} / {cell['strength']} {statistics.fmean(cell['first_step']['endorsement']):.2f}: "
            + ", ".join(f"{key} {statistics.fmean(values):+.2f}" for key, values in cell["gain_over_vanilla"].items())
            for cell in sorted(cells, key=lambda cell: statistics.fmean(cell["first_step"]["endorsement"]))
        )
        + " (accuracy minus vanilla OPD's, mean over seeds)."
    )
    wins = study.get("beats_vanilla") or []
    if wins:
        for win in wins:
            lines.append(
                f"- Measured where a DOPD configuration beat vanilla OPD by more than one seed-to-seed std: "
                f"{win['variant']} on "
                f"{win['task']} / {win['strength']} (endorsement {mean_std(win['endorsement'])}; gain "
                f"{mean_std(win['gain'])})."
            )
    else:
        lines.append(
            "- In no measured cell did a DOPD configuration beat vanilla OPD by more than one seed-to-seed standard "
            "deviation."
        )
    lines.append(f"- {study['caveat']}")
    return lines


# ------------------------------------------------------------------------------ outputs
def _write(out: Path, result: dict, pooled: dict[str, Tensor], step_rows: list[dict], rollouts: list[dict]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "json": str(out / "diagnose.json"),
        "png": str(out / "diagnose.png"),
        "rollouts": str(out / "diagnose_rollouts.jsonl"),
    }
    _plot(out / "diagnose.png", result, pooled, step_rows)
    (out / "diagnose_rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rollouts), encoding="utf-8")
    (out / "diagnose.json").write_text(json.dumps({**result, "files": files}, indent=2) + "\n", encoding="utf-8")
    return files


def _plot(path: Path, result: dict, pooled: dict[str, Tensor], step_rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = diagnose_figure(result, pooled, step_rows)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def diagnose_figure(result: dict, pooled: dict[str, Tensor], step_rows: list[dict]):
    """diagnose.png: regime occupancy under both rules and histograms of A, q_T - q_S and the
    information edge; every legend beside its panel, never on the data."""
    import matplotlib.pyplot as plt

    s = result["summary"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0][0]
    rows = [("paper's rule", "frac"), ("edge check", "edge_check/frac")]
    for y, (_label, prefix) in enumerate(rows):
        left = 0.0
        for name in REGIME_NAMES:
            share = s[f"{prefix}/{name}"]
            ax.barh(y, share, left=left, color=REGIME_COLORS[name], label=name if y == 0 else None)
            if share > 0.04:
                ax.text(left + share / 2, y, f"{name}\n{share:.3f}", ha="center", va="center", fontsize=8)
            left += share
    ax.set(
        yticks=range(len(rows)),
        yticklabels=[label for label, _ in rows],
        xlim=(0, 1),
        xlabel="share of tokens",
        title=f"regime occupancy ({result['tokens']} tokens, {len(step_rows)} steps)",
    )
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=len(REGIME_NAMES))
    panels = [
        (
            axes[0][1],
            pooled["advantage_gap"],
            "advantage gap A = |l_T - l_S| (nats)",
            [statistics.fmean(r["threshold/A"] for r in step_rows)],
            "mean threshold",
        ),
        (
            axes[1][0],
            pooled["q_teacher"] - pooled["q_student"],
            f"q_T - q_S (endorsement {s['endorsement']:.2f} = share >= 0)",
            [0.0],
            None,
        ),
        (
            axes[1][1],
            pooled["information_edge"],
            f"information edge l_T(y|x,p) - l_T(y|x) (nats; {s['information_edge/above_1nat']:.2f} above 1)",
            [INFORMATION_EDGE_NATS],
            None,
        ),
    ]
    for ax, values, title, lines, line_label in panels:
        ax.hist(values.float().cpu().numpy(), bins=50, color="#777777")
        for x in lines:
            ax.axvline(x, color="#e4572e", linestyle="--", label=line_label)
        ax.set(title=title, ylabel="tokens")
        if line_label:
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle(f"dopd diagnose: {result['recipe']['student']} / {result['recipe']['teacher']}", fontsize=10)
    fig.tight_layout()
    return fig
