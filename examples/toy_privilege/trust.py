"""The trust study: when should the student trust its teacher? (run through `run.py --study trust`)

    python -m examples.toy_privilege.run --task two_step --study trust     # ~70 min on 2 cores

DOPD's HS rule (high advantage gap, q_S > q_T: learn from the student's own privileged view) is
justified by the privileged teacher being unreliable there. Every earlier toy teacher was an
oracle, so this study gives `two_step` a teacher with a **blind spot**: trained (both views) on
`meta.blind_solution`, which drops the carry into the tens on carry problems (answer off by 10
exactly there) while the hint stays true. Beside it, the **clean** teacher of the earlier studies.
The student is the strength study's "high" one (WARMUP_STEPS), warmed up on the correct solutions,
so it is right and confident where the blind-spot teacher is wrong. Everything is scored against
the true answer, per subset (carry / no_carry) and overall.

Each method runs at its own learning rate, chosen from LEARNING_RATES by greedy accuracy on a dev
split of training problems (strength.dev_split; never the held-out ones), on seed 0, per teacher;
seeds 1 and 2 then run at the chosen rate. A first-step readout (readout.py, no training) reads
the gradient's composition token by token.

Writes OUT (default runs/toy_privilege/trust/TASK): seedS/ (data, models/{student, teacher_clean,
teacher_blind}, eval/), runs/TEACHER/LABEL_lrLR-seedS/, selection.json, readout.json, results.md,
results.json, trust.png; and, beside it (OUT/..), trust_study.json (copied into dopd_vl/assets/).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import statistics
import time
from pathlib import Path

from examples.toy_privilege import harness as toy
from examples.toy_privilege import strength

TEACHERS = {"clean": "meta.solution", "blind": "meta.blind_solution"}
"""Teacher -> its supervised target (both views); the student always learns `meta.solution`."""
LEARNING_RATES = (3e-4, 1e-3, 1e-4)
"""Candidates, in run order (the earlier studies' rate first). Ties on dev go to the earlier one."""
SELECTION_SEED = 0
DIAG = strength.DIAG
METHODS = (
    f"vanilla_opd=vanilla_opd;{DIAG}",
    f"vanilla_sampled=vanilla_opd;objective.baseline_support=sampled;{DIAG}",
    f"dopd=dopd;{DIAG}",
    f"dopd_initial=dopd;objective.privileged_student=initial;{DIAG}",
    f"dopd_edge=dopd;objective.edge_check=plain_teacher;{DIAG}",
    # The attribution control: `initial` with HS sent to the privileged teacher, so it differs from
    # dopd_initial only in what the HS route does.
    f"hs_to_teacher=dopd;objective.privileged_student=initial;objective.regime_routes={{HS: {{target: teacher_priv}}}};"
    f"{DIAG}",
)
VERIFIED_METHODS = (
    "vanilla_opd",
    "vanilla_filtered=vanilla_opd;data.teacher_filter=verified",
    "dopd_initial=dopd;objective.privileged_student=initial",
    "dopd_initial_verified=dopd;objective.privileged_student=initial;objective.trust=verified",
    "dopd_verified=dopd;objective.trust=verified",
    "uni_opd",
)
"""The verified-routing cells (`--study verified`): vanilla OPD, the practitioner's filter on the
teacher's verdicts, DOPD `initial` with the paper's rule and with `trust: verified`, DOPD live
with `trust: verified`, and Uni-OPD (docs/design.md §1.12, §1.10). Without `diagnostics` (training
is the same with it; the verdicts' token shares are logged anyway)."""
LABELS = {
    "vanilla_opd": "vanilla OPD (top-K RKL, plain teacher)",
    "vanilla_filtered": "vanilla OPD on the records whose teacher verdict is right",
    "dopd_initial_verified": "DOPD initial, trust: verified (ours)",
    "dopd_verified": "DOPD live, trust: verified (ours)",
    "uni_opd": "Uni-OPD (released recipe)",
    "vanilla_sampled": "vanilla OPD, sampled token",
    "dopd": "DOPD (live, the paper's)",
    "dopd_initial": "DOPD, initial privileged student",
    "dopd_edge": "DOPD + edge check (ours)",
    "hs_to_teacher": "control: initial, HS to the teacher",
}


def _label(spec: str) -> str:
    return toy.parse_method(spec)[0]


def _lr_tag(lr: float) -> str:
    return f"lr{lr:g}"


@dataclasses.dataclass(frozen=True)
class Job:
    """One unit of work for a worker process: a seed's preparation or one distillation run."""

    out: Path
    task_name: str
    size: toy.Size
    seed: int
    device: str
    teacher: str = ""
    spec: str = ""
    lr: float = 0.0
    on_dev: bool = False
    readout: bool = False


def seed_paths(out: Path, seed: int) -> dict[str, Path]:
    base = out / f"seed{seed}"
    return {
        "base": base,
        "train": base / "data" / "train.jsonl",
        "heldout": base / "data" / "heldout.jsonl",
        "dev": base / "data" / "dev.jsonl",
        "student": base / "models" / "student",
        **{f"teacher_{t}": base / "models" / f"teacher_{t}" for t in TEACHERS},
        "reports": base / "eval" / "reports.json",
    }


def prepare_seed(job: Job) -> dict:
    """Seed `job.seed`'s data (train, held-out, dev), both teachers, the student, and their
    evaluations (plain and with the context, held-out and dev)."""
    paths = seed_paths(job.out, job.seed)
    if paths["reports"].exists():
        return json.loads(paths["reports"].read_text())
    task = toy.TASKS[job.task_name]
    train, heldout = toy.write_data(paths["base"], job.task_name, job.size, job.seed)
    dev = strength.dev_split(paths["base"], job.task_name, job.seed, job.size.heldout_problems)
    for name, target in TEACHERS.items():
        toy.train_model(
            paths[f"teacher_{name}"],
            "teacher",
            job.task_name,
            train,
            job.seed,
            job.size.teacher_sft_steps,
            job.device,
            target=target,
        )
    toy.train_model(paths["student"], "student", job.task_name, train, job.seed, job.size.student_sft_steps, job.device)
    evals = paths["base"] / "eval"
    evals.mkdir(parents=True, exist_ok=True)
    reports = {}
    for model in ("student", *(f"teacher_{t}" for t in TEACHERS)):
        for split, data in (("heldout", heldout), ("dev", dev)):
            for privileged in (False, True):
                key = f"{model}_{'priv' if privileged else 'plain'}_{split}"
                reports[key] = toy.evaluate(
                    paths[model], data, evals / f"{key}.json", task, privileged=privileged, device=job.device
                )
    paths["reports"].write_text(json.dumps(reports, indent=2))
    return reports


def run_dir(out: Path, teacher: str, label: str, lr: float, seed: int) -> Path:
    return out / "runs" / teacher / f"{label}_{_lr_tag(lr)}-seed{seed}"


def distill_and_evaluate(job: Job) -> dict:
    """One method at one learning rate from the seed's student with one teacher; held-out (and dev)."""
    label, paths = _label(job.spec), seed_paths(job.out, job.seed)
    folder = run_dir(job.out, job.teacher, label, job.lr, job.seed)

    def distill_once() -> dict:
        task = toy.TASKS[job.task_name]
        prepared = toy.Prepared(paths["train"], paths["heldout"], paths[f"teacher_{job.teacher}"], paths["student"], {})
        final = toy.distill(
            f"{job.spec};optim.lr={job.lr}", job.seed, prepared, folder, job.size.distill_steps, task, job.device
        )
        evals = folder / "eval"
        evals.mkdir(parents=True, exist_ok=True)
        report = {"heldout": toy.evaluate(final, paths["heldout"], evals / "heldout.json", task, device=job.device)}
        if job.on_dev:
            report["dev"] = toy.evaluate(final, paths["dev"], evals / "dev.json", task, device=job.device)
        report["training"] = toy.training_summary(folder)
        print(
            f"{job.teacher} {label} {_lr_tag(job.lr)} seed {job.seed}: held-out {report['heldout']['accuracy']:.3f} "
            f"{report['heldout']['per_type']}" + (f", dev {report['dev']['accuracy']:.3f}" if job.on_dev else ""),
            flush=True,
        )
        return report

    return toy.cached_json(folder.parent / f"{folder.name}.summary.json", distill_once)


def first_step_readout(job: Job) -> dict:
    """readout.py on the seed's student with one teacher (no training)."""
    from examples.toy_privilege import readout

    paths = seed_paths(job.out, job.seed)
    path = job.out / "readout" / f"{job.teacher}-seed{job.seed}.json"
    prepared = toy.Prepared(paths["train"], paths["heldout"], paths[f"teacher_{job.teacher}"], paths["student"], {})
    return toy.cached_json(
        path,
        lambda: readout.readout(path.with_suffix(""), job.seed, prepared, toy.TASKS[job.task_name], job.device),
    )


def _work(job: Job) -> dict:
    if job.readout:
        return first_step_readout(job)
    return distill_and_evaluate(job) if job.spec else prepare_seed(job)


def _single_thread() -> None:
    import torch

    torch.set_num_threads(1)  # tiny models: one process per core beats two threads per process


def run_jobs(jobs: list, workers: int, work=_work) -> list[dict]:
    """`work(job)` for each of `jobs` on `workers` processes (1: in this process), results in job
    order; `work` is a module-level function (the processes are spawned)."""
    if workers <= 1 or len(jobs) <= 1:
        return [work(job) for job in jobs]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_single_thread) as pool:
        return list(pool.map(work, jobs))


def choose_lr(results: dict[float, dict]) -> float:
    """The rate of the best dev accuracy; on ties the first run (`max` keeps the first maximum)."""
    return max(results, key=lambda lr: results[lr]["dev"]["accuracy"])


def run_study(
    out: Path,
    task_name: str,
    size: toy.Size,
    device: str = "cpu",
    methods: tuple[str, ...] = METHODS,
    learning_rates: tuple[float, ...] = LEARNING_RATES,
    workers: int = 2,
    readout: bool = True,
) -> dict:
    """Prepare every seed, select each method's rate on seed 0's dev split, run the other seeds at
    it, read the first step, and write the tables, the figure and the measured cells. Finished
    pieces (reports, run summaries, the readout) are reused, so an interrupted study resumes."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    base = Job(out, task_name, size, 0, device)
    prepared = dict(zip(size.seeds, run_jobs([dataclasses.replace(base, seed=s) for s in size.seeds], workers)))
    for seed, reports in prepared.items():
        print(
            f"seed {seed}: student {reports['student_plain_heldout']['accuracy']:.3f}; teachers (with context) "
            + ", ".join(f"{t} {reports[f'teacher_{t}_priv_heldout']['per_type']}" for t in TEACHERS),
            flush=True,
        )
    seed0 = SELECTION_SEED if SELECTION_SEED in size.seeds else size.seeds[0]
    selection_jobs = [
        dataclasses.replace(base, seed=seed0, teacher=t, spec=spec, lr=lr, on_dev=True)
        for lr in learning_rates
        for t in TEACHERS
        for spec in methods
    ]
    selection_results = run_jobs(selection_jobs, workers)
    dev = {}
    for job, result in zip(selection_jobs, selection_results):
        dev.setdefault(job.teacher, {}).setdefault(_label(job.spec), {})[job.lr] = result
    chosen = {t: {label: choose_lr(per_lr) for label, per_lr in per_label.items()} for t, per_label in dev.items()}
    (out / "selection.json").write_text(
        json.dumps(
            {
                "seed": seed0,
                "learning_rates": list(learning_rates),
                "dev_accuracy": {
                    t: {
                        label: {f"{lr:g}": r["dev"]["accuracy"] for lr, r in per_lr.items()}
                        for label, per_lr in pl.items()
                    }
                    for t, pl in dev.items()
                },
                "chosen": chosen,
            },
            indent=2,
        )
    )
    final_jobs = [
        dataclasses.replace(base, seed=seed, teacher=t, spec=spec, lr=chosen[t][_label(spec)])
        for seed in size.seeds
        if seed != seed0
        for t in TEACHERS
        for spec in methods
    ]
    results: dict[str, dict[str, dict[int, dict]]] = {
        t: {label: {seed0: per_lr[chosen[t][label]]} for label, per_lr in pl.items()} for t, pl in dev.items()
    }
    for job, result in zip(final_jobs, run_jobs(final_jobs, workers)):
        results[job.teacher][_label(job.spec)][job.seed] = result
    readout_jobs = [
        dataclasses.replace(base, seed=seed, teacher=t, readout=True)
        for t in TEACHERS
        for seed in size.seeds
        if readout
    ]
    readouts: dict[str, dict[int, dict]] = {}
    for job, result in zip(readout_jobs, run_jobs(readout_jobs, workers)):
        readouts.setdefault(job.teacher, {})[job.seed] = result
    payload = {
        "task": task_name,
        "size": size.__dict__,
        "prepared": prepared,
        "selection": json.loads((out / "selection.json").read_text()),
        "results": results,
        "readout": readouts,
        "minutes": (time.perf_counter() - started) / 60,
    }
    payload = json.loads(json.dumps(payload))  # the JSON form (string keys) for tables and cells alike
    text = trust_tables(payload)
    (out / "results.md").write_text(text, encoding="utf-8")
    (out / "results.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")
    _plot(out / "trust.png", payload)
    study = study_summary(payload)
    (out.parent / "trust_study.json").write_text(json.dumps(study, indent=2) + "\n", encoding="utf-8")
    print(text)
    return payload


# ---------------------------------------------------------------------------- tables and cells
SUBSETS = ("no_carry", "carry")


def accuracy(result: dict, subset: str | None = None) -> float:
    """Held-out accuracy of a run summary, overall or on a question type."""
    heldout = result["heldout"]
    return heldout["accuracy"] if subset is None else heldout["per_type"].get(subset, 0.0)


def gains(payload: dict, teacher: str, label: str, subset: str | None = None) -> list[float]:
    """Held-out accuracy minus vanilla OPD's (each at its chosen lr), per seed, same student and teacher."""
    runs, vanilla = payload["results"][teacher][label], payload["results"][teacher]["vanilla_opd"]
    return [accuracy(r, subset) - accuracy(vanilla[s], subset) for s, r in runs.items()]


def _start(payload: dict, key: str, subset: str | None = None) -> list[float]:
    reports = [p[key] for p in payload["prepared"].values()]
    return [r["accuracy"] if subset is None else r["per_type"].get(subset, 0.0) for r in reports]


def _readout(payload: dict, teacher: str, key, default=None) -> list[float]:
    values = [key(r) for r in payload["readout"].get(teacher, {}).values()]
    return [v for v in values if v is not None] or ([] if default is None else [default])


def trust_tables(payload: dict) -> str:
    fmt, size = toy.mean_std, payload["size"]
    selection = payload["selection"]
    text = (
        f"# Trust study `{payload['task']}`\n\nThe strength study's high student ({size['student_sft_steps']} warm-up "
        f"steps), a clean and a blind-spot teacher ({size['teacher_sft_steps']} steps each; the blind spot: the carry "
        f"dropped on carry problems), {size['distill_steps']} distillation steps, seeds {size['seeds']}; every method "
        f"at the learning rate chosen on seed {selection['seed']}'s dev split; held-out accuracy against the true "
        f"answer; {payload['minutes']:.1f} min this invocation.\n\n"
        "## The models at the start (held-out, greedy)\n\n| model | overall | no_carry | carry |\n|---|---|---|---|\n"
    )
    for key, name in (
        ("student_plain_heldout", "student (no context)"),
        ("student_priv_heldout", "student with the context"),
        *(
            (f"teacher_{t}_{v}_heldout", f"{t} teacher, {'with' if v == 'priv' else 'no'} context")
            for t in TEACHERS
            for v in ("priv", "plain")
        ),
    ):
        text += f"| {name} | " + " | ".join(fmt(_start(payload, key, sub)) for sub in (None, *SUBSETS)) + " |\n"
    text += (
        f"\n## Learning rate, chosen on the dev split (seed {selection['seed']}; dev accuracy per rate, the chosen in "
        "bold)\n\n| teacher | method | "
        + " | ".join(f"lr {lr:g}" for lr in selection["learning_rates"])
        + " |\n|---|---|"
        + "---|" * len(selection["learning_rates"])
        + "\n"
    )
    for teacher, per_label in selection["dev_accuracy"].items():
        for label, per_lr in per_label.items():
            chosen = f"{selection['chosen'][teacher][label]:g}"
            cells = [f"**{v:.3f}**" if lr == chosen else f"{v:.3f}" for lr, v in per_lr.items()]
            text += f"| {teacher} | {label} | " + " | ".join(cells) + " |\n"
    text += (
        "\n## Held-out accuracy after distillation (mean ± std over seeds)\n\n| teacher | method | lr | overall | "
        "no_carry | carry | overall minus vanilla OPD | carry minus vanilla OPD | guard alarms |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    for teacher, per_label in payload["results"].items():
        for label, runs in per_label.items():
            alarms = sum(r["training"]["collapse_alarm_step"] is not None for r in runs.values())
            vs = label != "vanilla_opd"
            text += (
                f"| {teacher} | {label} | {selection['chosen'][teacher][label]:g} | "
                + " | ".join(fmt([accuracy(r, sub) for r in runs.values()]) for sub in (None, *SUBSETS))
                + f" | {fmt(gains(payload, teacher, label)) if vs else ''} | "
                f"{fmt(gains(payload, teacher, label, 'carry')) if vs else ''} | {alarms}/{len(runs)} |\n"
            )
    if not payload["readout"]:  # a study run without the readout (--study verified)
        return text
    text += (
        "\n## The first step, read token by token (no training; mean ± std over seeds)\n\n"
        "On-track tokens: the prefix equals the true solution's; right = the reference's next token (the student: "
        "sampled it; the teacher: its argmax with the context).\n\n| | "
        + " | ".join(TEACHERS)
        + " |\n|---|"
        + "---|" * len(TEACHERS)
        + "\n"
    )
    rows = {
        "LH / LL / HT / HS (paper's rule)": lambda t: " / ".join(
            fmt(_readout(payload, t, lambda r, g=g: r[f"frac/{g}"])) for g in ("LH", "LL", "HT", "HS")
        ),
        "on-track share of tokens": lambda t: fmt(_readout(payload, t, lambda r: r["on_track"])),
        "student right, teacher wrong (all on-track tokens)": lambda t: fmt(
            _readout(payload, t, lambda r: r["base_student_right_teacher_wrong"])
        ),
        "**HS precision** (student right, teacher wrong, among on-track HS)": lambda t: fmt(
            _readout(payload, t, lambda r: r["hs_precision"])
        ),
        "on-track HS tokens per step": lambda t: fmt(_readout(payload, t, lambda r: float(r["hs_on_track"]))),
        "HT tokens where the student is wrong (on-track HT)": lambda t: fmt(
            _readout(payload, t, lambda r: r["ht_student_wrong"])
        ),
        "HS share of tokens, student's right / wrong responses": lambda t: (
            fmt(_readout(payload, t, lambda r: r["hs_share_correct"]))
            + " / "
            + fmt(_readout(payload, t, lambda r: r["hs_share_wrong"]))
        ),
        **{
            f"gradient norm, {name}": (lambda t, name=name: fmt(_readout(payload, t, lambda r: r["grad_norm"][name])))
            for name in ("vanilla", "dopd", "LH", "LL", "HT", "HS")
        },
        **{
            f"cosine with vanilla OPD's gradient, {name}": (
                lambda t, name=name: fmt(_readout(payload, t, lambda r: r["cosine_with_vanilla"][name]))
            )
            for name in ("dopd", "LH", "LL", "HT", "HS")
        },
        "HT: \\|∇JS\\| / \\|∇RKL\\| (full vocabulary, same tokens)": lambda t: fmt(
            _readout(payload, t, lambda r: r["ht_js_over_rkl"])
        ),
    }
    for name, cell in rows.items():
        text += f"| {name} | " + " | ".join(cell(t) for t in TEACHERS) + " |\n"
    return text


def study_summary(payload: dict) -> dict:
    """The measured cells `dopd diagnose` quotes (dopd_vl/assets/trust_study.json): per teacher, the
    start accuracies, the first-step readout and each method's held-out accuracy minus vanilla OPD's."""
    cells = []
    for teacher in payload["results"]:
        cells.append(
            {
                "teacher": teacher,
                "student_accuracy": _start(payload, "student_plain_heldout"),
                "teacher_priv_accuracy": _start(payload, f"teacher_{teacher}_priv_heldout"),
                "teacher_plain_accuracy": _start(payload, f"teacher_{teacher}_plain_heldout"),
                "hs_precision": _readout(payload, teacher, lambda r: r["hs_precision"]),
                "hs_share_correct": _readout(payload, teacher, lambda r: r["hs_share_correct"]),
                "hs_share_wrong": _readout(payload, teacher, lambda r: r["hs_share_wrong"]),
                "learning_rate": payload["selection"]["chosen"][teacher],
                "gain_over_vanilla": {
                    label: gains(payload, teacher, label)
                    for label in payload["results"][teacher]
                    if label != "vanilla_opd"
                },
                "carry_gain_over_vanilla": {
                    label: gains(payload, teacher, label, "carry")
                    for label in payload["results"][teacher]
                    if label != "vanilla_opd"
                },
            }
        )
    return {
        "source": "examples/toy_privilege/RESULTS.md, the trust study",
        "scope": f"two_step, a clean and a blind-spot teacher x {len(payload['size']['seeds'])} seeds; tiny Qwen3 "
        f"models on CPU, each method at its dev-chosen lr",
        "methods": {label: LABELS[label] for label in payload["results"][next(iter(payload["results"]))]},
        "cells": cells,
        "caveat": "Tiny models and a synthetic blind spot (one carry rule): a direction for your data, not a "
        "prediction.",
    }


def _plot(path: Path, payload: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teachers = list(payload["results"])
    labels = list(payload["results"][teachers[0]])
    fig, axes = plt.subplots(1, len(SUBSETS) + 1, figsize=(16, 4.8), sharey=True)
    width = 0.8 / len(teachers)
    for ax, subset in zip(axes, (None, *SUBSETS)):
        for i, teacher in enumerate(teachers):
            values = [[accuracy(r, subset) for r in payload["results"][teacher][label].values()] for label in labels]
            means = [statistics.fmean(v) for v in values]
            stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
            xs = [x + (i - (len(teachers) - 1) / 2) * width for x in range(len(labels))]
            ax.bar(xs, means, width, yerr=stds, capsize=3, label=f"{teacher} teacher")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set(title=f"held-out accuracy, {subset or 'overall'}", ylim=(0, 1))
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
