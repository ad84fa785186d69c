"""The verified-routing study (run through `run.py --study verified`; docs/design.md §1.12):

    python -m examples.toy_privilege.run --task two_step --study verified     # trust cells (clean + blind-spot teacher)
    python -m examples.toy_privilege.run --task add_hidden --study verified   # strength cells (clean teacher)

The question: is there a configuration that is never below the better of vanilla OPD and the
practitioner's filtered baseline (vanilla OPD on the records whose teacher verdict is right) by
more than noise, and keeps the trust study's blind-spot win? Methods (trust.VERIFIED_METHODS):
vanilla OPD, vanilla OPD + `data.teacher_filter: verified`, DOPD `initial` with the paper's rule and
with `objective.trust: verified`, DOPD live with `trust: verified`, and `uni_opd`.

* **Trust cells** (`two_step`): the trust study's design (trust.py) with these methods: a clean and
  a blind-spot teacher, the strength study's high student (450 warm-up steps), each method's
  learning rate chosen on seed 0's dev split, 3 seeds; no token readout (the trust study has it),
  the verdicts' first-step token shares from the training logs instead. The clean-teacher half is
  also the strength study's `two_step` cell at its high student (same teacher recipe, warm-up and
  steps; the learning rate chosen on dev instead of fixed at 3e-4). OUT/trust/.
* **Strength cells** (`add_hidden`): the strength study's design (strength.py) at its high student
  (200 warm-up steps), where every DOPD configuration trailed vanilla OPD with a clean teacher: lr
  3e-4, 3 seeds. OUT/strength/.

OUT defaults to runs/toy_privilege/verified/TASK; afterwards `tables(ROOT)` (ROOT = OUT's parent)
writes ROOT/results.md and ROOT/verified_study.json from every task measured so far (copied into
examples/toy_privilege/results/verified/ and dopd_vl/assets/).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

from examples.toy_privilege import harness as toy
from examples.toy_privilege import strength, trust

METHODS = trust.VERIFIED_METHODS


def run(
    out: Path,
    task_name: str,
    size_name: str = "full",
    device: str = "auto",
    methods: tuple[str, ...] = METHODS,
) -> dict:
    """A task's cells (two_step: the trust cells; add_hidden: the strength cells), then the tables.
    Finished runs are reused, so an interrupted study resumes."""
    task = toy.TASKS[task_name]
    size = task.sizes[size_name]
    if size_name != "smoke":  # the strength study's high student, as in the trust study
        size = dataclasses.replace(size, student_sft_steps=strength.WARMUP_STEPS[task_name][-1])
    if task_name == "two_step":
        trust.run_study(out / "trust", task_name, size, device, methods=methods, readout=False)
    else:
        toy.run_methods(
            out / "strength",
            task_name,
            size,
            [(m, None) for m in methods],
            reuse=True,
            device=device,
            teacher_cache=out / "strength" / "teachers",
        )
    text = tables(out.parent)  # every task's cells measured so far under the study's root
    print(text)
    return json.loads((out.parent / "verified_study.json").read_text())


# ---------------------------------------------------------------------------- tables and cells
STRENGTH_LR = 3e-4
"""The strength study's one learning rate (config.yaml's), kept for its cells."""
BASELINES = ("vanilla_opd", "vanilla_filtered")
"""The two baselines every configuration is held against: vanilla OPD and the filtered baseline."""
SUBSETS = {"two_step": ("no_carry", "carry"), "add_hidden": ("visible", "hidden_digit")}


def _per_seed(runs: dict, key) -> list[float]:
    return [key(r) for _, r in sorted(runs.items(), key=lambda kv: int(kv[0]))]


def cells(root: Path) -> list[dict]:
    """The measured cells under a study root (runs/toy_privilege/verified): two_step's trust cells
    (one per teacher) and add_hidden's strength cell, each a dict of per-seed lists."""
    out = []
    trust_results = root / "two_step" / "trust" / "results.json"
    if trust_results.exists():
        payload = json.loads(trust_results.read_text())
        for teacher, per_label in payload["results"].items():
            prepared = [payload["prepared"][s] for s in sorted(payload["prepared"], key=int)]
            out.append(
                _cell(
                    f"two_step, {teacher} teacher",
                    "trust",
                    "two_step",
                    teacher,
                    [p["student_plain_heldout"]["accuracy"] for p in prepared],
                    [p[f"teacher_{teacher}_priv_heldout"]["accuracy"] for p in prepared],
                    {label: {s: r["heldout"] for s, r in runs.items()} for label, runs in per_label.items()},
                    {label: {s: r["training"] for s, r in runs.items()} for label, runs in per_label.items()},
                    payload["selection"]["chosen"][teacher],
                )
            )
    strength_results = root / "add_hidden" / "strength" / "results.json"
    if strength_results.exists():
        payload = json.loads(strength_results.read_text())
        prepared = [payload["prepared"][s] for s in sorted(payload["prepared"], key=int)]
        out.append(
            _cell(
                "add_hidden, clean teacher",
                "strength",
                "add_hidden",
                "clean",
                [p["student_start"]["accuracy"] for p in prepared],
                [p["teacher_priv"]["accuracy"] for p in prepared],
                {label: dict(runs.items()) for label, runs in payload["results"].items()},
                {label: {s: r["training"] for s, r in runs.items()} for label, runs in payload["results"].items()},
                dict.fromkeys(payload["results"], STRENGTH_LR),
            )
        )
    return out


def _cell(name, study, task, teacher, student, teacher_priv, heldout, training, lrs) -> dict:
    accuracy = {label: _per_seed(runs, lambda r: r["accuracy"]) for label, runs in heldout.items()}
    subsets = {
        sub: {label: _per_seed(runs, lambda r, sub=sub: r["per_type"].get(sub, 0.0)) for label, runs in heldout.items()}
        for sub in SUBSETS[task]
    }
    best = [max(v, f) for v, f in zip(accuracy["vanilla_opd"], accuracy["vanilla_filtered"])]
    others = [label for label in accuracy if label not in BASELINES]
    first = {
        label: {
            key.removeprefix("first/"): _per_seed(runs, lambda r, key=key: r[key])
            for key in next(iter(runs.values()))
            if key.startswith("first/") and key.split("/")[1] in ("trust", "uni_opd", "verify")
        }
        for label, runs in training.items()
    }
    return {
        "name": name,
        "study": study,
        "task": task,
        "teacher": teacher,
        "student_accuracy": student,
        "teacher_priv_accuracy": teacher_priv,
        "learning_rate": lrs,
        "accuracy": accuracy,
        "subsets": subsets,
        "gain_over_vanilla": {
            label: [a - b for a, b in zip(accuracy[label], accuracy["vanilla_opd"])] for label in accuracy
        },
        "gain_over_filtered": {
            label: [a - b for a, b in zip(accuracy[label], accuracy["vanilla_filtered"])] for label in accuracy
        },
        "gain_over_best_baseline": {label: [a - b for a, b in zip(accuracy[label], best)] for label in others},
        "first_step": {label: shares for label, shares in first.items() if shares},
        "guard_alarms": {
            label: sum(r["collapse_alarm_step"] is not None for r in runs.values()) for label, runs in training.items()
        },
    }


def _noise(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def answer(measured: list[dict]) -> tuple[str, dict]:
    """The study's question, answered from the cells: which configurations are never below the
    better baseline by more than noise (mean gain >= -std over seeds, in every cell) and keep the
    blind-spot win (gain over vanilla OPD with the blind teacher above its noise, and not below
    DOPD initial's by more than noise)."""
    labels = list(measured[0]["gain_over_best_baseline"])
    verdicts = {}
    for label in labels:
        worst = min((statistics.fmean(c["gain_over_best_baseline"][label]), c["name"]) for c in measured)
        never_below = all(
            statistics.fmean(c["gain_over_best_baseline"][label]) >= -_noise(c["gain_over_best_baseline"][label])
            for c in measured
        )
        blind = next((c for c in measured if c["teacher"] == "blind"), None)
        keeps = None
        if blind is not None:
            gain = blind["gain_over_vanilla"][label]
            reference = blind["gain_over_vanilla"]["dopd_initial"]
            keeps = statistics.fmean(gain) > _noise(gain) and statistics.fmean(gain) >= statistics.fmean(
                reference
            ) - max(_noise(gain), _noise(reference))
        verdicts[label] = {"never_below_best_baseline": never_below, "worst_cell": worst[1], "worst_gain": worst[0],
                           "keeps_blind_spot_win": keeps}  # fmt: skip
    both = [label for label, v in verdicts.items() if v["never_below_best_baseline"] and v["keeps_blind_spot_win"]]
    if both:
        text = (
            f"Yes: {', '.join(both)} never fell below the better of vanilla OPD and the filtered baseline by more than "
            "the seed-to-seed noise in any measured cell, and kept the blind-spot win."
        )
    else:
        parts = [
            f"{label} {'never below' if v['never_below_best_baseline'] else 'below'} the better baseline "
            f"(worst: {v['worst_gain']:+.3f} in {v['worst_cell']}), "
            f"{'keeps' if v['keeps_blind_spot_win'] else 'loses'} the blind-spot win"
            for label, v in verdicts.items()
        ]
        text = "No measured configuration does both: " + "; ".join(parts) + "."
    return text, verdicts


def study_summary(measured: list[dict]) -> dict:
    """The cells `dopd diagnose` quotes (dopd_vl/assets/verified_study.json)."""
    text, verdicts = answer(measured)
    return {
        "source": "examples/toy_privilege/RESULTS.md, the verified-routing study",
        "scope": f"{len(measured)} cells (two_step with a clean and a blind-spot teacher, add_hidden with a clean "
        "one) x 3 seeds; tiny Qwen3 models on CPU",
        "methods": {label: trust.LABELS[label] for label in measured[0]["accuracy"]},
        "cells": measured,
        "answer": text,
        "verdicts": verdicts,
        "caveat": "Tiny models, two synthetic tasks and one synthetic blind spot: a direction for your data, not a "
        "prediction.",
    }


def tables(root: Path) -> str:
    """results.md under `root` (both tasks' cells) and verified_study.json beside it."""
    fmt = toy.mean_std
    measured = cells(root)
    if not measured:
        raise FileNotFoundError(f"no verified-routing results under {root}")
    summary = study_summary(measured)
    text = "# Verified routing: the cells (mean ± std over seeds)\n\n"
    text += (
        "| cell | method | lr | held-out accuracy | "
        + " | ".join(f"{a} / {b}" for a, b in SUBSETS.values())
        + " | minus vanilla OPD | minus the filtered baseline | minus the better of the two | guard alarms |\n"
    )
    text += "|---|---|---|---|" + "---|" * len(SUBSETS) + "---|---|---|---|\n"
    for cell in measured:
        for label, values in cell["accuracy"].items():
            subs = [
                " / ".join(fmt(cell["subsets"][s][label]) for s in SUBSETS[task]) if task == cell["task"] else ""
                for task in SUBSETS
            ]
            text += (
                f"| {cell['name']} | {label} | {cell['learning_rate'][label]:g} | {fmt(values)} | "
                + " | ".join(subs)
                + f" | {fmt(cell['gain_over_vanilla'][label]) if label != 'vanilla_opd' else ''}"
                f" | {fmt(cell['gain_over_filtered'][label]) if label != 'vanilla_filtered' else ''}"
                f" | {fmt(cell['gain_over_best_baseline'].get(label, []))}"
                f" | {cell['guard_alarms'][label]}/{len(values)} |\n"
            )
    text += (
        "\n## The first step: verdicts and what they move (shares of the step's tokens; verify/*: of its responses)\n\n"
    )
    text += "| cell | method | shares |\n|---|---|---|\n"
    for cell in measured:
        for label, shares in cell["first_step"].items():
            if label in BASELINES and label != "vanilla_filtered":
                continue
            text += (
                f"| {cell['name']} | {label} | "
                + ", ".join(f"{k} {fmt(v)}" for k, v in shares.items() if not k.startswith("verify/none"))
                + " |\n"
            )
    text += f"\n## The answer\n\n{summary['answer']}\n"
    (root / "results.md").write_text(text, encoding="utf-8")
    (root / "verified_study.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    plot(root / "verified.png", measured)
    return text


def plot(path: Path, measured: list[dict]) -> None:
    """verified.png: held-out accuracy minus the better baseline, per cell and configuration (bars:
    mean over seeds, whiskers: std), beside each baseline's own accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(measured), figsize=(5 * len(measured), 4.2), sharey=True)
    for ax, cell in zip(axes if len(measured) > 1 else [axes], measured):
        labels = list(cell["gain_over_best_baseline"])
        values = [cell["gain_over_best_baseline"][label] for label in labels]
        means = [statistics.fmean(v) for v in values]
        stds = [_noise(v) for v in values]
        ax.bar(
            range(len(labels)), means, yerr=stds, capsize=3, color=["#4477aa" if m >= 0 else "#cc6677" for m in means]
        )
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        baselines = ", ".join(f"{b} {statistics.fmean(cell['accuracy'][b]):.3f}" for b in BASELINES)
        ax.set_title(f"{cell['name']}\n({baselines})", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    first = axes[0] if len(measured) > 1 else axes
    first.set_ylabel("held-out accuracy minus the better baseline")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
