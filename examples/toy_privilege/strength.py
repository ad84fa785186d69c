"""The student-strength study: where does DOPD help? (run through `run.py --study calibrate|strength`)

    python -m examples.toy_privilege.run --task add_hidden --study calibrate   # warm-up curve -> WARMUP_STEPS
    # 3 strengths x 3 seeds x 5 methods + the longer run
    python -m examples.toy_privilege.run --task add_hidden --study strength

The hypothesis from the main study: DOPD trails vanilla OPD because the toy students are weak, so
their sampled mistakes are tokens the teacher rejects (q_T < q_S) and the capability edge lands in
HS. Students of three strengths, from the same data and teacher of each seed, differ only in the
length of their supervised warm-up. The lengths were chosen by `--study calibrate` before any
distillation result: the student's greedy accuracy on a dev split (fresh problems from the
training distribution, never the held-out ones) after each warm-up length of a grid, divided by the
teacher's plain accuracy on the same split, averaged over the seeds; for each target ratio (0.25,
0.5, 0.75) the grid length whose mean ratio is nearest. Every run logs `diagnostics: true`
(`diag/*` metrics: the endorsement rate, DOPD's regime shares with and without the edge check,
the information edge), so the first step of a run is exactly what `dopd diagnose` reports.

Writes OUT (default runs/toy_privilege/strength/TASK): calibration.{md,json}; LEVEL/ (run.py's
layout: seeds, runs, results.md/json); results.md / results.json (the strength tables);
long_run.png; and, beside the tasks (OUT/..): strength.png (both tasks) and strength_study.json
(the measured points `dopd diagnose` quotes; copied into dopd_vl/assets/).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
import time
from pathlib import Path

from examples.toy_privilege import harness as toy

LEVELS = ("low", "middle", "high")
TARGET_RATIOS = (0.25, 0.5, 0.75)
"""Student warm-up targets: greedy accuracy as a share of the teacher's plain accuracy (dev split)."""
CALIBRATION_GRID = {
    "add_hidden": (5, 10, 15, 20, 30, 40, 50, 60, 80, 100, 130, 160, 200, 250, 300, 400),
    "two_step": (50, 100, 150, 200, 250, 300, 350, 400, 450, 500, 600, 700, 800, 1000),
}
WARMUP_STEPS = {"add_hidden": (80, 130, 200), "two_step": (300, 400, 450)}
"""Warm-up steps for the low / middle / high student, chosen by `--study calibrate` before any
distillation of this study (results/strength/TASK/calibration.md: mean dev ratios 0.23 / 0.55 /
0.85 and 0.33 / 0.52 / 0.76)."""
DIAG = "diagnostics=true"
METHODS = (
    f"vanilla_opd=vanilla_opd;{DIAG}",
    f"uniform=uniform;{DIAG}",
    f"dopd=dopd;{DIAG}",
    f"dopd_initial=dopd;objective.privileged_student=initial;{DIAG}",
    f"dopd_edge=dopd;objective.edge_check=plain_teacher;{DIAG}",
)
VARIANTS = {
    "dopd": "DOPD (live, the paper's)",
    "dopd_initial": "DOPD, initial privileged student",
    "dopd_edge": "DOPD + edge check (ours)",
}
LONG_LABELS = ("vanilla_opd", "dopd_initial", "dopd_edge")
LONG_FACTOR = 2
LONG_CHECKPOINTS = 4


def dev_split(base: Path, task_name: str, seed: int, count: int) -> Path:
    """Fresh problems from the training distribution (two_step: training triples), never held-out ones."""
    return toy.write_split(
        base / "data" / "dev.jsonl", count, seed=3000 + seed, task=task_name, split_seed=seed, split="train"
    )


def calibrate(
    out: Path, task_name: str, size: toy.Size, device: str = "auto", grid: tuple[int, ...] | None = None
) -> dict:
    """The warm-up curve of each seed's student on the dev split, and the lengths chosen from it."""
    from dopd_vl import (
        EvalConfig,
        accuracy_report,
        build_char_tokenizer,
        eos_token_ids,
        generate_answers,
        load_model,
        load_records,
        make_adapter,
    )

    started = time.perf_counter()
    task, grid = toy.TASKS[task_name], tuple(grid or CALIBRATION_GRID[task_name])
    tokenizer = build_char_tokenizer()
    adapter = make_adapter(tokenizer)
    eval_config = EvalConfig(max_new_tokens=task.max_new_tokens, batch_size=64)
    curves = {}
    for seed in size.seeds:
        base = out / f"seed{seed}"
        train, _ = toy.write_data(base, task_name, size, seed)
        dev = load_records(dev_split(base, task_name, seed, size.heldout_problems))
        teacher = load_model(
            toy.prepare_teacher(base, task_name, size, seed, train, device, out / "teachers"), device=device
        ).eval()
        eos = eos_token_ids(tokenizer, teacher)
        teacher_dev = accuracy_report(dev, generate_answers(teacher, adapter, dev, eval_config, eos))["accuracy"]
        student_dev: dict[int, float] = {}

        def evaluate_at(step: int, model) -> None:
            if step in grid:
                student_dev[step] = accuracy_report(dev, generate_answers(model, adapter, dev, eval_config, eos))[
                    "accuracy"
                ]

        toy.train_model(
            base / "models" / "student_calibration",
            "student",
            task_name,
            train,
            seed,
            max(grid),
            device,
            on_step=evaluate_at,
        )
        curves[seed] = {"teacher_plain_dev": teacher_dev, "student_dev": student_dev}
        print(
            f"seed {seed}: teacher (plain) {teacher_dev:.3f} on dev; student "
            + ", ".join(f"{k}: {v:.3f}" for k, v in student_dev.items()),
            flush=True,
        )
    ratio = {
        step: statistics.mean(_share(curves[s]["student_dev"][step], curves[s]["teacher_plain_dev"]) for s in curves)
        for step in grid
    }
    chosen = [min(grid, key=lambda step: abs(ratio[step] - target)) for target in TARGET_RATIOS]
    payload = {
        "task": task_name,
        "grid": list(grid),
        "targets": list(TARGET_RATIOS),
        "curves": curves,
        "mean_ratio": ratio,
        "chosen": chosen,
        "minutes": (time.perf_counter() - started) / 60,
    }
    text = (
        f"# Warm-up calibration `{task_name}`\n\nStudent greedy accuracy on a dev split ({size.heldout_problems} fresh "
        f"problems of the "
        f"training distribution, never held-out ones) after each warm-up length, as a share of the teacher's plain "
        f"accuracy on the same split; "
        f"seeds {list(size.seeds)}; {payload['minutes']:.1f} min.\n\n| warm-up steps | "
        + " | ".join(f"seed {s}" for s in curves)
        + " | mean ratio |\n|---|"
        + "---|" * (len(curves) + 1)
        + "\n"
    )
    for step in grid:
        text += (
            f"| {step} | "
            + " | ".join(f"{curves[s]['student_dev'][step]:.3f} / {curves[s]['teacher_plain_dev']:.3f}" for s in curves)
            + f" | {ratio[step]:.3f} |\n"
        )
    text += (
        "\nChosen (nearest mean ratio to "
        + ", ".join(f"{t}" for t in TARGET_RATIOS)
        + "): "
        + ", ".join(f"{lvl} {n} steps" for lvl, n in zip(LEVELS, chosen))
        + "\n"
    )
    (out / "calibration.md").write_text(text, encoding="utf-8")
    (out / "calibration.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")
    print(text)
    return payload


def run_study(
    out: Path,
    task_name: str,
    size: toy.Size,
    device: str = "auto",
    reuse: bool = False,
    warmup: tuple[int, ...] | None = None,
    methods: tuple[str, ...] = METHODS,
    long_run: bool = True,
) -> dict:
    """Every level's students through run.py's pipeline (shared teachers), then the tables, the
    longer run, the combined figure and the measured points."""
    started = time.perf_counter()
    warmup = tuple(warmup or WARMUP_STEPS[task_name])
    levels = {}
    for level, steps in zip(LEVELS, warmup):
        print(f"== {task_name}: {level} student ({steps} warm-up steps)", flush=True)
        level_size = dataclasses.replace(size, student_sft_steps=steps)
        levels[level] = toy.run_methods(
            out / level,
            task_name,
            level_size,
            [(m, None) for m in methods],
            reuse=reuse,
            device=device,
            teacher_cache=out / "teachers",
        )
    long = (
        long_runs(out, task_name, dataclasses.replace(size, student_sft_steps=warmup[-1]), device, reuse)
        if long_run
        else None
    )
    payload = {
        "task": task_name,
        "warmup_steps": dict(zip(LEVELS, warmup)),
        "size": size.__dict__,
        "levels": levels,
        "long_run": long,
        "minutes": (time.perf_counter() - started) / 60,
    }
    text = strength_tables(payload)
    (out / "results.md").write_text(text, encoding="utf-8")
    (out / "results.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")
    combine(out.parent)
    print(text)
    return payload


def long_runs(out: Path, task_name: str, size: toy.Size, device: str, reuse: bool) -> dict:
    """Seed 0, the strongest student, LONG_FACTOR x the steps: vanilla, DOPD initial, DOPD + edge
    check, with held-out accuracy at LONG_CHECKPOINTS checkpoints (do the curves cross later?)."""
    steps = LONG_FACTOR * size.distill_steps
    every = steps // LONG_CHECKPOINTS
    specs = [
        (
            f"long_{label}={method_of(label)};max_steps={steps};save_steps={every};"
            f"save_total_limit={LONG_CHECKPOINTS + 1}",
            (0,),
        )
        for label in LONG_LABELS
    ]
    level_dir = out / LEVELS[-1]
    if not reuse:  # the level's preparation is reused below; its earlier long runs are not
        for stale in [*level_dir.glob("runs/long_*"), *level_dir.glob("seed0/eval/long_*")]:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    results = toy.run_methods(
        level_dir,
        task_name,
        size,
        specs,
        reuse=True,
        device=device,
        teacher_cache=out / "teachers",
        report_name="long_results",
    )
    task, prepared = toy.TASKS[task_name], level_dir / "seed0"
    curves = {}
    for label in LONG_LABELS:
        run_dir = level_dir / "runs" / f"long_{label}-seed0"
        points = {0: results["prepared"][0]["student_start"]["accuracy"]}
        for checkpoint in sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
            report = prepared / "eval" / f"long_{label}_{checkpoint.name}.json"
            if not report.exists():  # removed above unless --reuse
                toy.evaluate(checkpoint / "model", prepared / "data" / "heldout.jsonl", report, task, device=device)
            points[int(checkpoint.name.split("-")[1])] = json.loads(report.read_text())["accuracy"]
        curves[label] = points
    _plot_long(out / "long_run.png", task_name, curves, level_dir)
    return {"steps": steps, "heldout_accuracy": curves}


def method_of(label: str) -> str:
    return next(spec.split("=", 1)[1] for spec in METHODS if spec.split("=", 1)[0] == label)


def _seed_values(level: dict, label: str, key) -> list[float]:
    return [key(r) for r in level["results"][label].values()]


def gains(level: dict, label: str) -> list[float]:
    """Held-out accuracy minus vanilla OPD's, per seed (same seed, same student)."""
    vanilla = level["results"]["vanilla_opd"]
    return [r["accuracy"] - vanilla[s]["accuracy"] for s, r in level["results"][label].items()]


def start_relative(level: dict) -> list[float]:
    """Each seed's starting student as a share of its teacher's plain accuracy (held-out)."""
    return [_share(p["student_start"]["accuracy"], p["teacher_plain"]["accuracy"]) for p in level["prepared"].values()]


def _share(student: float, teacher: float) -> float:
    return student / teacher if teacher > 0 else 0.0  # a teacher at 0 only in smoke-sized tests


def first_step(level: dict, key: str) -> list[float]:
    """A diagnostic at the first step: the same student and rollouts in every method's run of a seed."""
    return [r["training"][f"first/diag/{key}"] for r in level["results"]["vanilla_opd"].values()]


def strength_tables(payload: dict) -> str:
    fmt = toy.mean_std
    levels = payload["levels"]
    text = (
        f"# Student-strength study `{payload['task']}`\n\nWarm-up steps {payload['warmup_steps']} (from "
        f"calibration.md, fixed before any "
        f"distillation), {payload['size']['distill_steps']} distillation steps, seeds {payload['size']['seeds']}; "
        f"{payload['minutes']:.1f} min this invocation.\n\n"
    )
    text += (
        "## The students at the first step (what `dopd diagnose` reads)\n\n| student | start accuracy | of the "
        "teacher's | endorsement | "
        "LH / LL / HT / HS (paper's rule) | HT with the edge check | information edge (nats) | share above 1 nat "
        "|\n|---|---|---|---|---|---|---|---|\n"
    )
    for level, data in levels.items():
        starts = [p["student_start"]["accuracy"] for p in data["prepared"].values()]
        shares = " / ".join(fmt(first_step(data, f"frac/{g}")) for g in ("LH", "LL", "HT", "HS"))
        text += (
            f"| {level} ({payload['warmup_steps'][level]} steps) | {fmt(starts)} | {fmt(start_relative(data))} | "
            f"{fmt(first_step(data, 'endorsement'))} | "
            f"{shares} | {fmt(first_step(data, 'edge_check/frac/HT'))} | "
            f"{fmt(first_step(data, 'information_edge/mean'))} | "
            f"{fmt(first_step(data, 'information_edge/above_1nat'))} |\n"
        )
    text += (
        "\n## Held-out accuracy after distillation\n\n| student | method | accuracy | minus vanilla OPD (per seed) | "
        "endorsement, mean over training | "
        "HT share, mean over training | guard alarms |\n|---|---|---|---|---|---|---|\n"
    )
    for level, data in levels.items():
        for label, per_seed in data["results"].items():
            train = [r["training"] for r in per_seed.values()]
            alarms = sum(t["collapse_alarm_step"] is not None for t in train)
            ht = [t.get("frac/HT", t.get("mean/diag/frac/HT")) for t in train]
            text += (
                f"| {level} | {label} | {fmt([r['accuracy'] for r in per_seed.values()])} | "
                f"{fmt(gains(data, label)) if label != 'vanilla_opd' else ''} | "
                f"{fmt([t['mean/diag/endorsement'] for t in train])} | {fmt(ht)} | {alarms}/{len(train)} |\n"
            )
    long = payload.get("long_run")
    if long:
        text += (
            f"\n## The longer run (seed 0, the high student, {long['steps']} steps): held-out accuracy at "
            f"checkpoints\n\n"
        )
        steps = sorted({int(k) for points in long["heldout_accuracy"].values() for k in points})
        text += "| method | " + " | ".join(f"step {s}" for s in steps) + " |\n|---|" + "---|" * len(steps) + "\n"
        for label, points in long["heldout_accuracy"].items():
            points = {int(k): v for k, v in points.items()}
            text += f"| {label} | " + " | ".join(f"{points[s]:.3f}" if s in points else "" for s in steps) + " |\n"
    return text


def study_cells(payload: dict) -> list[dict]:
    """A task's measured points, one per student strength: the first-step diagnostics and each
    DOPD variant's held-out accuracy minus vanilla OPD's, per seed."""
    return [
        {
            "task": payload["task"],
            "strength": level,
            "warmup_steps": payload["warmup_steps"][level],
            "start_relative": start_relative(data),
            "first_step": {
                k: first_step(data, k)
                for k in (
                    "endorsement",
                    "frac/HT",
                    "edge_check/frac/HT",
                    "information_edge/mean",
                    "information_edge/above_1nat",
                )
            },
            "gain_over_vanilla": {v: gains(data, v) for v in VARIANTS if v in data["results"]},
        }
        for level, data in payload["levels"].items()
    ]


def combine(root: Path) -> dict | None:
    """strength.png over every task's results.json under `root`, and strength_study.json: the
    measured points `dopd diagnose` quotes (per task and level: first-step diagnostics and each
    variant's accuracy minus vanilla OPD's, per seed)."""
    payloads = [
        payload
        for payload in (json.loads(p.read_text()) for p in sorted(root.glob("*/results.json")))
        if "levels" in payload
    ]
    if not payloads:
        return None
    cells = [cell for payload in payloads for cell in study_cells(payload)]
    wins = [
        {
            "task": cell["task"],
            "strength": cell["strength"],
            "variant": VARIANTS[variant],
            "gain": values,
            "endorsement": cell["first_step"]["endorsement"],
        }
        for cell in cells
        for variant, values in cell["gain_over_vanilla"].items()
        if len(values) > 1 and statistics.mean(values) > statistics.stdev(values)
    ]
    study = {
        "source": "examples/toy_privilege/RESULTS.md, the student-strength study",
        "scope": f"{len(payloads)} toy task(s) x {len(LEVELS)} student strengths x 3 seeds; tiny Qwen3 models on CPU, "
        f"lr 3e-4",
        "variants": VARIANTS,
        "cells": cells,
        "beats_vanilla": wins,
        "caveat": "Tiny models, synthetic tasks and learning rates 60-200x the paper's: a direction for your data, not "
        "a prediction.",
    }
    (root / "strength_study.json").write_text(json.dumps(study, indent=2) + "\n", encoding="utf-8")
    _plot_strength(root / "strength.png", cells)
    return study


def _plot_strength(path: Path, cells: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"dopd": "#e4572e", "dopd_initial": "#4e9be6", "dopd_edge": "#59a14f"}
    markers = {"add_hidden": "o", "two_step": "s"}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for cell in cells:
        for variant, values in cell["gain_over_vanilla"].items():
            for ax, xs in zip(axes, (cell["start_relative"], cell["first_step"]["endorsement"])):
                ax.scatter(xs, values, color=colors[variant], marker=markers.get(cell["task"], "^"), alpha=0.8, s=30)
    for variant, color in colors.items():
        axes[0].scatter([], [], color=color, label=VARIANTS[variant])
    for task, marker in markers.items():
        axes[0].scatter([], [], color="#444444", marker=marker, label=task)
    axes[0].set(
        xlabel="student's start accuracy / teacher's plain accuracy (held-out)",
        ylabel="held-out accuracy: DOPD variant − vanilla OPD",
        title="gain over vanilla OPD vs student strength (a point per seed)",
    )
    axes[1].set(
        xlabel="teacher endorsement rate at the first step (q_T ≥ q_S, with the context)",
        title="gain over vanilla OPD vs endorsement rate",
    )
    for ax in axes:
        ax.axhline(0, color="#444444", linewidth=0.8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_long(path: Path, task_name: str, curves: dict, level_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dopd_vl import read_metrics

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for label, points in curves.items():
        steps = sorted(int(k) for k in points)
        axes[0].plot(steps, [points[s] for s in steps], marker="o", label=label)
        rows = read_metrics(level_dir / "runs" / f"long_{label}-seed0")
        acc = [r.get("accuracy", float("nan")) for r in rows]
        window = max(1, len(acc) // 20)
        axes[1].plot(
            [r["step"] for r in rows],
            [statistics.mean(acc[max(0, i - window + 1) : i + 1]) for i in range(len(acc))],
            label=label,
        )
    axes[0].set(title=f"{task_name}, high student, seed 0: held-out accuracy (greedy)", xlabel="step")
    axes[1].set(title="rollout accuracy on training prompts (T = 1, smoothed)", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
