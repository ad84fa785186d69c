"""The toy studies' harness (examples/toy_privilege): the tasks and their sizes, a seed's data,
teacher and warmed-up student (`prepared_seed`), distillation through the package's Trainer
(`distill`), evaluation without privileged context through the public `generate_answers` /
`accuracy_report` (`evaluate`), one mean ± std formatter, and the main study's runner
(`run_methods`). run.py (the command), strength.py, trust.py and readout.py import it.

A method is a spec `LABEL=METHOD;key=value;...`, the syntax of `--methods` and of `dopd train`'s
overrides: `distill_config` applies it to config.yaml through `load_config`, so a spec typed on the
command line and one written in a study are read by the same code (the package itself builds
configs with `dataclasses.replace`).

Tasks (task.py): `add_hidden`, single-digit addition whose second operand may be hidden (the
context reveals it: information no student can infer); `two_step`, `a*b+c=` answered with a
worked solution, the context being the first step's result (inferable: the paper's regime).
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dopd_vl import (
    CollapseGuard,
    EvalConfig,
    SFTConfig,
    Trainer,
    accuracy_report,
    answer_ids,
    build_char_tokenizer,
    build_tiny_qwen3,
    build_view,
    eos_token_ids,
    generate_answers,
    load_config,
    load_model,
    load_processing,
    load_records,
    make_adapter,
    never_sampled_token_ids,
    output_embedding_weight,
    read_metrics,
    response_hidden_states,
    save_model_folder,
    supervised_finetune,
)
from examples.toy_privilege.task import write_split

HERE = Path(__file__).resolve().parent
logger = logging.getLogger(__name__)

METHODS = ("vanilla_opd", "privileged_opd", "self_distill", "uniform", "dopd")
# Ablations and variants are config overrides of the same engine (LABEL=METHOD;key=value;...).
ABLATIONS = (
    "dopd_initial=dopd;objective.privileged_student=initial",
    "self_distill_initial=self_distill;objective.privileged_student=initial",
    "dopd_noHS_LL=dopd;objective.regime_routes={HS: {enabled: false}, LL: {enabled: false}}",
    # Ours, not the paper's rule (fixed before any held-out result of either task was seen):
    # a high-gap token goes to the teacher only if its verdict survives without the context.
    "dopd_edge=dopd;objective.edge_check=plain_teacher",
    "dopd_edge_initial=dopd;objective.edge_check=plain_teacher;objective.privileged_student=initial",
)
PRUNE = tuple(f"prune_{by}=pruned_opd;objective.prune_by={by}" for by in ("largest_A", "random", "smallest_A"))
LEARNING_RATES = (1e-4, 1e-3)  # with the main runs' 3e-4: a 10x span
LR_METHODS = ("vanilla_opd", "dopd", "dopd_initial=dopd;objective.privileged_student=initial")
# The paper's LLM comparison methods, with the privileged teacher (as DOPD gets) and as published (plain).
COMPARISON = (
    "vanilla_opd",
    "privileged_opd",
    "dopd_initial=dopd;objective.privileged_student=initial",
    "eopd",
    "eopd_plain=eopd;objective.teacher_view=teacher_plain",
    "exopd",
    "exopd_plain=exopd;objective.teacher_view=teacher_plain",
    # Control: lambda 1 is vanilla OPD's sampled-token form, separating the extrapolation from the estimator.
    "exopd_lambda1_plain=exopd;objective.exopd_lambda=1.0;objective.teacher_view=teacher_plain",
)


@dataclass
class Size:
    seeds: tuple[int, ...]
    train_problems: int
    heldout_problems: int
    teacher_sft_steps: int
    student_sft_steps: int
    distill_steps: int


@dataclass
class Task:
    """What differs between the toy tasks; everything else is shared."""

    sizes: dict[str, Size]
    max_new_tokens: int  # rollout and evaluation
    sft_target: str  # the record field the teacher and student warm-up are trained on
    question_types: tuple[str, str]
    quick_methods: tuple[str, ...] = field(default=METHODS + ABLATIONS)


TASKS = {
    "add_hidden": Task(
        sizes={
            "full": Size((0, 1, 2), 4000, 400, 600, 130, 500),
            "quick": Size((0,), 4000, 400, 600, 130, 200),
            "smoke": Size((0,), 64, 16, 4, 2, 2),
        },
        max_new_tokens=4,
        sft_target="answer",
        question_types=("visible", "hidden_digit"),
    ),
    # Sizes fixed from the teacher's and the student's own calibration (accuracy after warm-up),
    # before any distillation result: teacher ~95% without hints; student weak but learning.
    "two_step": Task(
        sizes={
            "full": Size((0, 1, 2), 4000, 145, 600, 300, 200),
            "quick": Size((0,), 4000, 145, 600, 300, 100),
            "smoke": Size((0,), 64, 16, 4, 2, 2),
        },
        max_new_tokens=40,
        sft_target="meta.solution",
        question_types=("no_carry", "carry"),
        quick_methods=(
            "vanilla_opd",
            "privileged_opd",
            "dopd",
            "dopd_initial=dopd;objective.privileged_student=initial",
        ),
    ),
}


def study_methods(study: str, task: Task, quick: bool) -> list[tuple[str, tuple[int, ...] | None]]:
    """(method spec, seeds or None for all) in run order."""
    main = task.quick_methods if quick else METHODS + ABLATIONS
    specs = {
        "main": [(m, None) for m in main],
        "prune": [("vanilla_opd", None)] + [(m, None) for m in PRUNE],
        "lr": [],
        "comparison": [(m, None) for m in COMPARISON],
    }
    for lr in LEARNING_RATES:
        for spec in LR_METHODS:
            label, method, overrides = parse_method(spec)
            specs["lr"].append((";".join([f"{label}_lr{lr:g}={method}", *overrides, f"optim.lr={lr}"]), (0,)))
    chosen = [s for name in (("main", "prune", "lr") if study == "all" else (study,)) for s in specs[name]]
    return list(dict.fromkeys(chosen))


def per_token_report(model_dir: Path, data: Path, target: str, device: str = "auto") -> dict:
    """Teacher-forced on the reference responses (`target`), plain view: per-position accuracy of
    the argmax and entropy of the model's distribution."""
    model = load_model(model_dir, device=device).eval()
    tokenizer = build_char_tokenizer()
    adapter = make_adapter(tokenizer)
    records = load_records(data)
    correct, entropy, count = {}, {}, {}
    with torch.no_grad():
        for start in range(0, len(records), 64):
            batch = records[start : start + 64]
            view = build_view(adapter, "student", batch, [answer_ids(tokenizer, r, target) for r in batch]).to(
                next(model.parameters()).device
            )
            hidden = response_hidden_states(model, view)
            logp = (hidden @ output_embedding_weight(model).T).float().log_softmax(-1)
            hits = logp.argmax(-1) == view.response_ids
            ent = -(logp.exp() * logp).sum(-1)
            for b in range(len(batch)):
                for t in range(int(view.response_mask[b].sum())):
                    correct[t] = correct.get(t, 0) + int(hits[b, t])
                    entropy[t] = entropy.get(t, 0.0) + float(ent[b, t])
                    count[t] = count.get(t, 0) + 1
    tokens = sum(count.values())
    return {
        "token_accuracy": sum(correct.values()) / tokens,
        "answer_entropy": sum(entropy.values()) / tokens,
        "position_accuracy": [correct[t] / count[t] for t in sorted(count)],
        "position_entropy": [entropy[t] / count[t] for t in sorted(count)],
    }


def evaluate(
    model_dir: Path, data: Path, out: Path, task: Task, privileged: bool = False, device: str = "auto"
) -> dict:
    """Greedy answers without privileged context (unless asked) through the public `generate_answers`
    and `accuracy_report`, what `dopd eval` computes (its report written to `out`), plus the
    per-token report."""
    model, tokenizer = load_model(model_dir, "float32", device=device).eval(), load_processing(model_dir)
    records = load_records(data)
    config = EvalConfig(max_new_tokens=task.max_new_tokens, batch_size=64, privileged=privileged)
    eos, never = eos_token_ids(tokenizer, model), never_sampled_token_ids(tokenizer, model)
    report = accuracy_report(records, generate_answers(model, make_adapter(tokenizer), records, config, eos, never))
    placed = next(model.parameters())
    header = {"model": str(model_dir), "data": str(data), "engine": "hf", "privileged": privileged}
    header.update(device=str(placed.device), dtype=str(placed.dtype).removeprefix("torch."))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**header, **report}, indent=2) + "\n", encoding="utf-8")
    summary = {"accuracy": report["accuracy"], "per_type": {k: v["accuracy"] for k, v in report["per_type"].items()}}
    if not privileged:
        summary.update(per_token_report(model_dir, data, task.sft_target, device))
    return summary


@dataclass
class Prepared:
    train: Path
    heldout: Path
    teacher: Path
    student: Path
    reports: dict  # teacher plain / privileged, student start


def write_data(out: Path, task_name: str, size: Size, seed: int) -> tuple[Path, Path]:
    """Seed `seed`'s training and held-out problems."""
    train = write_split(
        out / "data" / "train.jsonl", size.train_problems, seed=1000 + seed, task=task_name, split_seed=seed
    )
    heldout = write_split(
        out / "data" / "heldout.jsonl",
        size.heldout_problems,
        seed=2000 + seed,
        task=task_name,
        split_seed=seed,
        split="heldout",
    )
    return train, heldout


def train_model(
    folder: Path,
    role: str,
    task_name: str,
    train: Path,
    seed: int,
    steps: int,
    device: str = "auto",
    on_step=None,
    target: str | None = None,
) -> Path:
    """Build seed `seed`'s teacher (4 layers x 128, trained with and without the context) or student
    (2 layers x 64, warmed up briefly: capable but weak) and train it on the reference responses
    (`target`, default the task's `sft_target`; the trust study's blind-spot teacher: `meta.blind_solution`).
    `on_step(n, model)` is called after every update (the strength study's warm-up curve)."""
    tokenizer = build_char_tokenizer()
    shape = (
        dict(hidden_size=128, num_layers=4, intermediate_size=512)
        if role == "teacher"
        else dict(hidden_size=64, num_layers=2, intermediate_size=256)
    )
    model_seed = (1 if role == "teacher" else 2) + 100 * seed
    build_tiny_qwen3(folder, tokenizer=tokenizer, num_heads=4, num_kv_heads=2, lm_head_rows=0, seed=model_seed, **shape)
    views = ("teacher_priv", "teacher_plain") if role == "teacher" else ("student", "student_priv")
    config = SFTConfig(
        steps=steps,
        batch_size=64,
        lr=1e-3,
        views=views,
        seed=model_seed,
        target=target or TASKS[task_name].sft_target,
    )
    model = load_model(folder, device=device)
    print(f"seed {seed}: supervised training of {folder.name}: {config.steps} steps on {config.views}", flush=True)
    callback = (lambda n: on_step(n, model)) if on_step is not None else None
    supervised_finetune(model, make_adapter(tokenizer), load_records(train), len(tokenizer), config, on_step=callback)
    save_model_folder(model, None, folder)
    return folder


def prepare(
    out: Path, task_name: str, size: Size, seed: int, device: str = "auto", teacher_cache: Path | None = None
) -> tuple[Path, Path, Path, Path]:
    """Seed `seed`'s data, teacher and warmed-up student (`size.student_sft_steps`). Seed 0 of
    add_hidden reproduces the first version of this experiment's preparation. `teacher_cache`:
    a folder of seed{S} teachers trained once and copied (the strength study's students share them)."""
    train, heldout = write_data(out, task_name, size, seed)
    teacher = prepare_teacher(out, task_name, size, seed, train, device, teacher_cache)
    student = train_model(out / "models" / "student", "student", task_name, train, seed, size.student_sft_steps, device)
    return train, heldout, teacher, student


def prepare_teacher(
    out: Path,
    task_name: str,
    size: Size,
    seed: int,
    train: Path,
    device: str = "auto",
    teacher_cache: Path | None = None,
) -> Path:
    """Seed `seed`'s teacher in OUT/models/teacher: copied from `teacher_cache/seed{S}` when there, else trained (and
    cached)."""
    teacher = out / "models" / "teacher"
    cached = teacher_cache / f"seed{seed}" if teacher_cache is not None else None
    if cached is not None and (cached / "config.json").exists():
        shutil.copytree(cached, teacher, dirs_exist_ok=True)
        return teacher
    train_model(teacher, "teacher", task_name, train, seed, size.teacher_sft_steps, device)
    if cached is not None:
        shutil.copytree(teacher, cached, dirs_exist_ok=True)
    return teacher


def prepared_seed(
    out: Path,
    task_name: str,
    size: Size,
    seed: int,
    reuse: bool,
    device: str = "auto",
    teacher_cache: Path | None = None,
) -> Prepared:
    base = out / f"seed{seed}"
    if reuse and (base / "eval" / "student_start.json").exists():
        paths = (
            base / "data" / "train.jsonl",
            base / "data" / "heldout.jsonl",
            base / "models" / "teacher",
            base / "models" / "student",
        )
        reports = json.loads((base / "eval" / "reports.json").read_text())
        return Prepared(*paths, reports)
    train, heldout, teacher, student = prepare(base, task_name, size, seed, device, teacher_cache)
    task, evals = TASKS[task_name], base / "eval"
    evals.mkdir(parents=True, exist_ok=True)
    reports = {
        "teacher_plain": evaluate(teacher, heldout, evals / "teacher_plain.json", task, device=device),
        "teacher_priv": evaluate(teacher, heldout, evals / "teacher_priv.json", task, privileged=True, device=device),
        "student_priv": evaluate(student, heldout, evals / "student_priv.json", task, privileged=True, device=device),
        "student_start": evaluate(student, heldout, evals / "student_start.json", task, device=device),
    }
    (evals / "reports.json").write_text(json.dumps(reports, indent=2))
    return Prepared(train, heldout, teacher, student, reports)


def distill(
    spec: str, seed: int, prepared: Prepared, run_dir: Path, steps: int, task: Task, device: str = "auto"
) -> Path:
    return Trainer(distill_config(spec, seed, prepared, run_dir, steps, task, device)).train(overwrite=True)


def distill_config(spec: str, seed: int, prepared: Prepared, run_dir: Path, steps: int, task: Task, device: str):
    """The shared recipe (config.yaml) with the seed's models and data and the method's overrides."""
    _, method, overrides = parse_method(spec)
    return load_config(
        HERE / "config.yaml",
        [
            f"student.name_or_path={prepared.student}",
            f"teacher.name_or_path={prepared.teacher}",
            f"data.train={prepared.train}",
            f"output_dir={run_dir}",
            f"objective.name={method}",
            f"seed={seed}",
            f"max_steps={steps}",
            f"rollout.max_new_tokens={task.max_new_tokens}",
            f"device={'cpu' if device == 'cpu' else 'auto'}",
            *overrides,
        ],
    )


def parse_method(spec: str) -> tuple[str, str, tuple[str, ...]]:
    """`name` or `label=name;key=value;...`: an ablation is a method plus config overrides."""
    label, _, rest = spec.partition("=") if ";" in spec else (spec, "", spec)
    name, *overrides = rest.split(";")
    return (label if ";" in spec else name), name, tuple(overrides)


def cached_json(path: Path, compute) -> dict:
    """`compute()`'s result, written to `path` as JSON; read back instead when `path` exists, so a study
    that stopped resumes where it was (each finished run and readout is one such file)."""
    if path.exists():
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result


def training_summary(run_dir: Path) -> dict:
    """From metrics.jsonl: mean regime occupancy, response length at start and end, and the
    collapse guard (its default settings replayed on the logged metrics, so that every run is
    judged by the same guard, whichever version trained it)."""
    rows = read_metrics(run_dir)
    tail = rows[-max(1, len(rows) // 10) :]
    guard = CollapseGuard()
    alarm = next((r["step"] for r in rows if guard.update(r) is not None), None)
    summary = {
        "response_length_start": statistics.mean(r["response_length"] for r in rows[: max(1, len(rows) // 10)]),
        "response_length_end": statistics.mean(r["response_length"] for r in tail),
        "entropy_end": statistics.mean(r["entropy/student"] for r in tail),
        "collapse_alarm_step": alarm,
        "collapse_kinds": guard.alarm.kinds if guard.alarm else [],
    }
    for regime in ("LH", "LL", "HT", "HS"):
        if f"frac/{regime}" in rows[0]:
            summary[f"frac/{regime}"] = statistics.mean(r[f"frac/{regime}"] for r in rows)
    for key in (k for k in rows[0] if k.split("/")[0] in ("trust", "uni_opd", "verify")):  # verdicts' shares
        summary[f"first/{key}"] = rows[0][key]
        summary[f"mean/{key}"] = statistics.mean(r[key] for r in rows)
    for key in (
        k for k in rows[0] if k.startswith("diag/")
    ):  # `diagnostics: true` runs: the first step and the mean over training
        summary[f"first/{key}"] = rows[0][key]
        summary[f"mean/{key}"] = statistics.mean(r[key] for r in rows)
    return summary


def mean_std(values: list[float]) -> str:
    """mean ± std over seeds (the value alone for one; empty for none): the one formatter of every table."""
    values = [v for v in values if v is not None]
    if not values:
        return ""
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def gap_recovered(acc: float, start: float, teacher: float) -> float | None:
    return (acc - start) / (teacher - start) if teacher != start else None


def summarise(task: Task, results: dict, prepared: dict[int, Prepared]) -> tuple[str, dict]:
    """Markdown tables: main (every label), pruning (gain relative to unpruned vanilla OPD), learning rate."""
    t1, t2 = task.question_types
    header = (
        f"| method | accuracy (mean ± std) | {t1} | {t2} | token accuracy | answer entropy (nats) | gap recovered | HT "
        f"share | response length (start → end) | guard alarm (step) |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    rows, numbers = [], {}
    seeds = sorted(prepared)
    starts = [prepared[s].reports["student_start"] for s in seeds]
    rows.append(
        f"| student (start) | {mean_std([r['accuracy'] for r in starts])} | "
        f"{mean_std([r['per_type'].get(t1, 0) for r in starts])} | "
        f"{mean_std([r['per_type'].get(t2, 0) for r in starts])} | {mean_std([r['token_accuracy'] for r in starts])} | "
        f"{mean_std([r['answer_entropy'] for r in starts])} | 0 | | | |"
    )
    for label, per_seed in results.items():
        if "_lr" in label:
            continue
        acc = [r["accuracy"] for r in per_seed.values()]
        gap = [
            gap_recovered(
                r["accuracy"],
                prepared[s].reports["student_start"]["accuracy"],
                prepared[s].reports["teacher_plain"]["accuracy"],
            )
            for s, r in per_seed.items()
        ]
        train = [r["training"] for r in per_seed.values()]
        alarms = [t["collapse_alarm_step"] for t in train]
        alarm = f"{sum(a is not None for a in alarms)}/{len(alarms)}" + (
            f" ({', '.join(str(a) for a in alarms if a is not None)})" if any(a is not None for a in alarms) else ""
        )
        numbers[label] = {"accuracy": acc, "gap_recovered": gap, "seeds": list(per_seed)}
        rows.append(
            f"| {label} | {mean_std(acc)} | {mean_std([r['per_type'].get(t1, 0) for r in per_seed.values()])} | "
            f"{mean_std([r['per_type'].get(t2, 0) for r in per_seed.values()])} | "
            f"{mean_std([r['token_accuracy'] for r in per_seed.values()])} | "
            f"{mean_std([r['answer_entropy'] for r in per_seed.values()])} | {mean_std(gap)} | "
            f"{mean_std([t.get('frac/HT') for t in train])} | "
            f"{mean_std([t['response_length_start'] for t in train])} → "
            f"{mean_std([t['response_length_end'] for t in train])} | {alarm} |"
        )
    for name, key in (
        ("teacher, no context", "teacher_plain"),
        ("teacher, with context", "teacher_priv"),
        ("student (start), with context", "student_priv"),
    ):
        reps = [prepared[s].reports[key] for s in seeds]
        rows.append(
            f"| {name} | {mean_std([r['accuracy'] for r in reps])} | "
            f"{mean_std([r['per_type'].get(t1, 0) for r in reps])} | "
            f"{mean_std([r['per_type'].get(t2, 0) for r in reps])} | | | | | | |"
        )
    text = header + "\n" + "\n".join(rows) + "\n"

    occupancy = [label for label, per_seed in results.items() if "frac/LH" in next(iter(per_seed.values()))["training"]]
    if occupancy:
        text += (
            "\nMean regime occupancy over training (fraction of tokens, mean over seeds):\n\n| method | LH | LL | "
            "HT | HS |\n|---|---|---|---|---|\n"
        )
        for label in occupancy:
            train = [r["training"] for r in results[label].values()]
            text += (
                f"| {label} | "
                + " | ".join(mean_std([t[f"frac/{g}"] for t in train]) for g in ("LH", "LL", "HT", "HS"))
                + " |\n"
            )

    pruned = [label for label in results if label.startswith("prune_")]
    if pruned and "vanilla_opd" in results:
        text += (
            "\nPruning (paper Fig. 4): 20% of each step's tokens dropped, vanilla OPD on the rest. Gain relative "
            "= (pruned − start) / (vanilla OPD − start), per seed.\n\n"
        )
        text += "| pruned by | accuracy | gain relative to unpruned vanilla OPD |\n|---|---|---|\n"
        vanilla = results["vanilla_opd"]
        for label in pruned:
            rel = [
                gap_recovered(r["accuracy"], prepared[s].reports["student_start"]["accuracy"], vanilla[s]["accuracy"])
                for s, r in results[label].items()
                if s in vanilla
            ]
            numbers[label]["gain_relative_to_vanilla"] = rel
            text += (
                f"| {label.removeprefix('prune_')} | {mean_std([r['accuracy'] for r in results[label].values()])} | "
                f"{mean_std(rel)} |\n"
            )

    lr_labels = [label for label in results if "_lr" in label]
    if lr_labels:
        text += (
            "\nLearning rate (seed 0; 3e-4 is the main runs'): accuracy / answer entropy at the end / guard alarm "
            "step.\n\n"
        )
        lrs = sorted({float(label.rsplit("_lr", 1)[1]) for label in lr_labels} | {3e-4})
        text += "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |\n|---|" + "---|" * len(lrs) + "\n"
        for method in dict.fromkeys(label.rsplit("_lr", 1)[0] for label in lr_labels):
            cells = []
            for lr in lrs:
                label = method if lr == 3e-4 else f"{method}_lr{lr:g}"
                r = results.get(label, {}).get(0)
                cells.append(
                    f"{r['accuracy']:.3f} / {r['training']['entropy_end']:.2f} / "
                    f"{r['training']['collapse_alarm_step'] or '–'}"
                    if r
                    else ""
                )
            text += f"| {method} | " + " | ".join(cells) + " |\n"
    return text, numbers


def plot_curves(out: Path, results: dict, name: str = "curves.png") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [label for label in results if "_lr" not in label and not label.startswith("prune_")]
    routed = [label for label in ("dopd", "dopd_initial", "dopd_edge") if label in results]
    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    for label in main:
        runs = [read_metrics(out / "runs" / f"{label}-seed{s}") for s in results[label]]
        steps = [m["step"] for m in runs[0]]
        for ax, key in zip(axes[0], ("accuracy", "entropy/student", "response_length")):
            mean = [statistics.mean(r[i].get(key, float("nan")) for r in runs) for i in range(len(steps))]
            window = max(1, len(mean) // 20)
            ax.plot(
                steps, [statistics.mean(mean[max(0, i - window + 1) : i + 1]) for i in range(len(mean))], label=label
            )
    for ax, label in zip(axes[1], routed):
        runs = [read_metrics(out / "runs" / f"{label}-seed{s}") for s in results[label]]
        steps = [m["step"] for m in runs[0]]
        for regime in ("LH", "LL", "HT", "HS"):
            ax.plot(
                steps, [statistics.mean(r[i][f"frac/{regime}"] for r in runs) for i in range(len(steps))], label=regime
            )
        ax.set(title=f"{label}: regime occupancy", xlabel="step", ylim=(0, 1))
    axes[0][0].set(title="rollout accuracy (training prompts, T=1, smoothed)", xlabel="step")
    axes[0][1].set(title="student entropy at response tokens (nats, smoothed)", xlabel="step")
    axes[0][2].set(title="response length (tokens, smoothed)", xlabel="step")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / name
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_methods(
    out: Path,
    task_name: str,
    size: Size,
    specs: list[tuple[str, tuple[int, ...] | None]],
    reuse: bool = False,
    device: str = "auto",
    teacher_cache: Path | None = None,
    report_name: str = "results",
) -> dict:
    """Prepare the seeds, train and evaluate every spec, write OUT/REPORT_NAME.{md,json} and the curves."""
    started = time.perf_counter()
    task = TASKS[task_name]
    out.mkdir(parents=True, exist_ok=True)
    seeds = sorted({s for _, only in specs for s in (only or size.seeds) if s in size.seeds} or set(size.seeds))
    prepared = {}
    for seed in seeds:
        prepared[seed] = p = prepared_seed(out, task_name, size, seed, reuse, device, teacher_cache)
        r = p.reports
        print(
            f"seed {seed}: teacher {r['teacher_priv']['accuracy']:.3f} with context, "
            f"{r['teacher_plain']['accuracy']:.3f} without; "
            f"student {r['student_start']['accuracy']:.3f} ({r['student_priv']['accuracy']:.3f} with context)",
            flush=True,
        )
    results: dict[str, dict[int, dict]] = {}
    for spec, only in specs:
        label = parse_method(spec)[0]
        for seed in (s for s in seeds if only is None or s in only):
            run_dir = out / "runs" / f"{label}-seed{seed}"
            report_path = out / f"seed{seed}" / "eval" / f"{label}.json"
            summary_path = report_path.with_suffix(".summary.json")
            if reuse and summary_path.exists():
                report = json.loads(summary_path.read_text())  # finished and evaluated earlier
                report["training"] = training_summary(run_dir)
            else:
                final = (
                    run_dir / "final"
                    if reuse and (run_dir / "final" / "config.json").exists()
                    else distill(spec, seed, prepared[seed], run_dir, size.distill_steps, task, device)
                )
                report = evaluate(final, prepared[seed].heldout, report_path, task, device=device)
                report["training"] = training_summary(run_dir)
                summary_path.write_text(json.dumps(report))
            results.setdefault(label, {})[seed] = report
            print(f"{label} seed {seed}: accuracy {report['accuracy']:.3f} {report['per_type']}", flush=True)
    table, numbers = summarise(task, results, prepared)
    curves = plot_curves(out, results, "curves.png" if report_name == "results" else f"{report_name}_curves.png")
    minutes = (time.perf_counter() - started) / 60
    text = (
        f"# Toy experiment `{task_name}`\n\n{len(seeds)} seed(s) (each: data, teacher, student warm-up, distillation), "
        f"{size.distill_steps} distillation steps per method, {size.heldout_problems} held-out problems, greedy, no "
        f"privileged context; "
        f"{minutes:.1f} min this invocation.\nGap recovered = (method − student) / (teacher without context − "
        f"student), exact-match accuracy, per seed.\n\n" + table
    )
    (out / f"{report_name}.md").write_text(text, encoding="utf-8")
    payload = {
        "task": task_name,
        "size": size.__dict__,
        "prepared": {s: p.reports for s, p in prepared.items()},
        "results": results,
        "table": numbers,
        "minutes": minutes,
        "curves": str(curves),
    }
    (out / f"{report_name}.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")
    print("\n" + text)
    return payload
