"""When the boxes lie: what each routing rule does with a detector's privileged boxes.

    python -m examples.visual_privilege.boxes_lie                 # 3 seeds, 2 worker processes
    python -m examples.visual_privilege.boxes_lie --size smoke    # the pipeline on a handful of scenes

A seed covers the whole pipeline (grid.py has the scenes, the questions and the detector):

1. grid scenes (train, dev and held-out scenes) with questions asked of the ground truth;
2. for each noise rate in RATES, the simulated detector's predictions written as a COCO results
   file and built through the package's `coco_results` reader and grounding builder (boxes as
   Qwen3-VL grounding text, every predicted box attached); each record's `meta.box_right` says
   whether the detector's boxes give its true answer (rate 0: the ground truth, jittered);
3. a tiny Qwen3-VL teacher (3 layers x 96) taught on the ground-truth boxes and without them (so it
   trusts boxes, and reads pixels without them), and a smaller student (2 layers x 64) warmed up
   on the answers, mostly without boxes, so that it answers from the image before distillation
   (its held-out accuracy is held against the best text-only answer, the majority answer per
   question type);
4. every method in METHODS distils from that student with the detector's boxes at each rate, at
   its learning rate chosen on seed 0's dev split at the highest rate; evaluation without boxes on
   the held-out scenes (per question type) and on the training questions (per subset: box-right /
   box-wrong, i.e. did the student learn the detector's mistakes?);
5. the first-step readout (no training) per rate: the share of HT tokens from records whose boxes
   lie, the share of those the edge check moves, HS precision, and the information edge on
   box-right vs box-wrong records.

Writes OUT (default runs/visual_privilege/boxes_lie): seedS/ (scenes, data, models, reports.json),
runs/rR/LABEL_lrLR-seedS/ (+ .summary.json), selection.json, readout/, results.md, results.json,
boxes_lie.png and boxes_lie_study.json (copied into dopd_vl/assets/). Finished pieces are reused,
so an interrupted study resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import statistics
import time
from pathlib import Path

from examples.toy_privilege import harness as toy
from examples.toy_privilege import trust
from examples.visual_privilege import grid

HERE = Path(__file__).resolve().parent
RATES = (0.0, 0.1, 0.3)
"""Detector noise rates (grid.detect): 0 is the ground truth; 0.1 and 0.3 miss, mislabel and invent."""
LEARNING_RATES = (1e-3, 3e-4)
"""Candidates, in run order; ties on dev go to the earlier one."""
METHODS = (
    "vanilla_opd",
    "privileged_opd",
    "dopd_initial=dopd;objective.privileged_student=initial",
    "dopd",
    "dopd_edge=dopd;objective.edge_check=plain_teacher",
    "vanilla_filtered=vanilla_opd;data.teacher_filter=verified",
    "dopd_initial_verified=dopd;objective.privileged_student=initial;objective.trust=verified",
)
LABELS = {
    "vanilla_opd": "vanilla OPD (teacher without boxes)",
    "privileged_opd": "privileged OPD (teacher with the boxes)",
    "dopd_initial": "DOPD, initial privileged student",
    "dopd": "DOPD (live, the paper's)",
    "dopd_edge": "DOPD + edge check (ours)",
    "vanilla_filtered": "vanilla OPD on the records whose teacher verdict is right",
    "dopd_initial_verified": "DOPD initial, trust: verified (ours)",
}
SUBSETS = ("box_right", "box_wrong")


@dataclasses.dataclass(frozen=True)
class Size:
    seeds: tuple[int, ...]
    train_scenes: int = 480
    dev_scenes: int = 64
    heldout_scenes: int = 96
    teacher_sft_steps: int = 900
    student_sft_steps: int = 450
    """Supervised steps (batch 16, lr 1e-3): the teacher alternates with and without the ground-truth
    boxes; the student sees the image alone on two steps of three (the third with the boxes), enough
    to beat the text-only baseline and leave room below the teacher."""
    steps: int = 40
    probe_records: int = 192
    """Training questions the student answers after distillation (the box-right / box-wrong subsets)."""
    readout_steps: int = 2
    rates: tuple[float, ...] = RATES
    learning_rates: tuple[float, ...] = LEARNING_RATES
    """Each method's learning rate is chosen among these on seed 0's dev split at the highest rate."""


SIZES = {
    "full": Size((0, 1, 2)),
    "smoke": Size(
        (0,),
        train_scenes=10,
        dev_scenes=3,
        heldout_scenes=3,
        teacher_sft_steps=2,
        student_sft_steps=2,
        steps=2,
        probe_records=8,
        readout_steps=1,
        rates=(0.3,),
        learning_rates=(1e-3,),
    ),
}


@dataclasses.dataclass(frozen=True)
class Job:
    """One unit of work for a worker process: a seed's preparation, a distillation run or a readout."""

    out: Path
    size: Size
    seed: int
    rate: float = 0.0
    spec: str = ""
    lr: float = 0.0
    on_dev: bool = False
    readout: bool = False


def _rate_tag(rate: float) -> str:
    return f"r{rate:g}"


def seed_paths(out: Path, seed: int) -> dict[str, Path]:
    base = out / f"seed{seed}"
    return {
        "base": base,
        "scenes": base / "scenes",
        "data": base / "data",
        "student": base / "models" / "student",
        "teacher": base / "models" / "teacher",
        "reports": base / "reports.json",
    }


def data_path(out: Path, seed: int, rate: float, split: str) -> Path:
    return seed_paths(out, seed)["data"] / _rate_tag(rate) / f"{split}.jsonl"


# ------------------------------------------------------------------------------------ preparation
def build_rate(paths: dict[str, Path], truth: dict, rate: float, seed: int, size: Size) -> dict:
    """The detector's predictions at `rate` through the package's COCO-results reader and grounding
    builder, split by scene into train / dev / heldout JSONL; returns the build's counts."""
    from data_builders import BuildReport, build_grounding, load_annotations

    scenes = paths["scenes"]
    predictions, predicted = grid.write_detections(scenes, truth, rate, seed)
    report = BuildReport()
    images = load_annotations(
        "coco_results",
        scenes / "images",
        predictions,
        categories=scenes / "annotations.json",
        on_error="skip",
        report=report,
    )
    folder = paths["data"] / _rate_tag(rate)
    built = folder / "all.jsonl"
    build_grounding(
        images,
        built,
        questions=scenes / "questions.jsonl",
        images_root=scenes / "images",
        objects="all",
        on_error="skip",
        report=report,
    )
    queries = {q["id"]: q for q in map(json.loads, (scenes / "questions.jsonl").read_text().splitlines())}
    order = sorted(truth)
    split_of = {
        name: "train" if k < size.train_scenes else "dev" if k < size.train_scenes + size.dev_scenes else "heldout"
        for k, name in enumerate(order)
    }
    lines: dict[str, list[str]] = {"train": [], "dev": [], "heldout": []}
    for line in built.read_text().splitlines():
        record = json.loads(line)
        query = queries[record["id"]]
        record["meta"]["box_right"] = grid.answer(query["type"], predicted[query["image"]]) == query["answer"]
        lines[split_of[query["image"]]].append(json.dumps(record))
    for split, rows in lines.items():
        (folder / f"{split}.jsonl").write_text("".join(r + "\n" for r in rows))
    built.unlink()
    return {
        "skipped_images": len(report.skipped),
        "records": {s: len(r) for s, r in lines.items()},
        "box_wrong_share": {
            s: sum(not json.loads(r)["meta"]["box_right"] for r in rows) / max(len(rows), 1)
            for s, rows in lines.items()
        },
    }


@functools.lru_cache(maxsize=2)
def _loaded(model_dir: str):
    """A finished model folder and its processor, loaded once per process (each is evaluated several times)."""
    from dopd_vl import load_model, load_processing

    return load_model(model_dir, "float32", device="cpu").eval(), load_processing(model_dir)


def evaluate(model_dir: Path, data: Path, privileged: bool = False, limit: int | None = None) -> dict:
    """Greedy accuracy without boxes (unless `privileged`): overall, per question type and per subset
    (box_right / box_wrong: whether the record's detector boxes give its true answer)."""
    from dopd_vl import (
        EvalConfig,
        accuracy_report,
        eos_token_ids,
        generate_answers,
        load_records,
        make_adapter,
        never_sampled_token_ids,
    )

    model, processing = _loaded(str(model_dir))
    records = load_records(data)[:limit]
    config = EvalConfig(max_new_tokens=4, batch_size=32, privileged=privileged)
    answers = generate_answers(
        model,
        make_adapter(processing, image_root=data.parent),
        records,
        config,
        eos_token_ids(processing, model),
        never_sampled_token_ids(processing, model),
    )
    report = accuracy_report(records, answers)
    box_right = {r["id"]: r["meta"]["box_right"] for r in records}
    per_subset = {}
    for subset, want in zip(SUBSETS, (True, False)):
        rows = [row["correct"] for row in report["responses"] if box_right[row["id"]] is want]
        if rows:
            per_subset[subset] = sum(rows) / len(rows)
    return {
        "accuracy": report["accuracy"],
        "per_type": {k: v["accuracy"] for k, v in report["per_type"].items()},
        "per_subset": per_subset,
        "count": report["count"],
    }


def prepare_seed(job: Job) -> dict:
    """Seed `job.seed`'s scenes, every rate's datasets, the teacher, the student and their reports."""
    from dopd_vl import DemoConfig, build_tiny_qwen3_vl, finetune_model, load_tokenizer

    paths, size = seed_paths(job.out, job.seed), job.size
    if paths["reports"].exists():
        return json.loads(paths["reports"].read_text())
    started = time.perf_counter()
    truth = grid.write_scenes(paths["scenes"], size.train_scenes + size.dev_scenes + size.heldout_scenes, job.seed)
    # rate 0 (the ground truth) always: the teacher learns with it
    builds = {_rate_tag(rate): build_rate(paths, truth, rate, job.seed, size) for rate in sorted({0.0, *size.rates})}
    clean = data_path(job.out, job.seed, 0.0, "train")
    tokenizer = load_tokenizer()
    teacher = build_tiny_qwen3_vl(
        paths["teacher"],
        tokenizer=tokenizer,
        hidden_size=96,
        num_layers=3,
        num_heads=6,
        intermediate_size=192,
        seed=100 * job.seed + 1,
    )
    student = build_tiny_qwen3_vl(paths["student"], tokenizer=tokenizer, seed=100 * job.seed + 2)
    print(
        f"seed {job.seed}: teacher {size.teacher_sft_steps} supervised steps, student {size.student_sft_steps}",
        flush=True,
    )
    demo = DemoConfig(seed=job.seed, device="cpu", dtype="float32")
    views = {"teacher": ("teacher_priv", "teacher_plain"), "student": ("student", "student", "student_priv")}
    finetune_model(teacher, clean, size.teacher_sft_steps, views["teacher"], job.seed + 1, demo, batch_size=16)
    finetune_model(student, clean, size.student_sft_steps, views["student"], job.seed, demo, batch_size=16)
    questions = [json.loads(q) for q in (paths["scenes"] / "questions.jsonl").read_text().splitlines()]
    train_ids = {json.loads(r)["id"] for r in clean.read_text().splitlines()}
    heldout = data_path(job.out, job.seed, 0.0, "heldout")
    heldout_ids = {json.loads(r)["id"] for r in heldout.read_text().splitlines()}
    reports = {
        "builds": builds,
        "majority": grid.majority_accuracy(
            [q for q in questions if q["id"] in train_ids], [q for q in questions if q["id"] in heldout_ids]
        ),
        "student_plain": evaluate(student, heldout),
        "student_priv": evaluate(student, heldout, privileged=True),
        "teacher_plain": evaluate(teacher, heldout),
        **{
            f"teacher_priv_{_rate_tag(r)}": evaluate(teacher, data_path(job.out, job.seed, r, "heldout"), True)
            for r in size.rates
        },
        "minutes": (time.perf_counter() - started) / 60,
    }
    paths["reports"].write_text(json.dumps(reports, indent=2))
    return reports


# ------------------------------------------------------------------------------------ distillation
def run_dir(out: Path, rate: float, label: str, lr: float, seed: int) -> Path:
    return out / "runs" / _rate_tag(rate) / f"{label}_lr{lr:g}-seed{seed}"


def distill_config(job: Job, folder: Path):
    from dopd_vl import load_config

    _, method, overrides = toy.parse_method(job.spec)
    paths = seed_paths(job.out, job.seed)
    return load_config(
        HERE / "config.yaml",
        [
            f"student.name_or_path={paths['student']}",
            f"teacher.name_or_path={paths['teacher']}",
            f"data.train={data_path(job.out, job.seed, job.rate, 'train')}",
            f"output_dir={folder}",
            f"objective.name={method}",
            f"seed={job.seed}",
            f"max_steps={job.size.steps}",
            f"optim.lr={job.lr}",
            *overrides,
        ],
    )


def distill_and_evaluate(job: Job) -> dict:
    """One method at one learning rate and rate from the seed's student: held-out (and dev), and the
    training questions per subset."""
    from dopd_vl import Trainer

    label = toy.parse_method(job.spec)[0]
    folder = run_dir(job.out, job.rate, label, job.lr, job.seed)

    def distill_once() -> dict:
        final = Trainer(distill_config(job, folder)).train(overwrite=True)
        report = {
            "heldout": evaluate(final, data_path(job.out, job.seed, job.rate, "heldout")),
            "train": evaluate(final, data_path(job.out, job.seed, job.rate, "train"), limit=job.size.probe_records),
        }
        if job.on_dev:
            report["dev"] = evaluate(final, data_path(job.out, job.seed, job.rate, "dev"))
        report["training"] = toy.training_summary(folder)
        print(
            f"{_rate_tag(job.rate)} {label} lr{job.lr:g} seed {job.seed}: held-out {report['heldout']['accuracy']:.3f} "
            f"train {report['train']['per_subset']}" + (f", dev {report['dev']['accuracy']:.3f}" if job.on_dev else ""),
            flush=True,
        )
        return report

    return toy.cached_json(folder.parent / f"{folder.name}.summary.json", distill_once)


def first_step_readout(job: Job) -> dict:
    """The first steps' tokens of DOPD on the rate's data (no training), split by the records' boxes."""
    path = job.out / "readout" / f"{_rate_tag(job.rate)}-seed{job.seed}.json"
    return toy.cached_json(path, lambda: _read_first_steps(job, path.with_suffix("")))


def _read_first_steps(job: Job, folder: Path) -> dict:
    import torch

    from dopd_vl import REGIME_NAMES, diagnose_tokens, setup_run

    config = dataclasses.replace(
        distill_config(dataclasses.replace(job, spec="dopd", lr=job.size.learning_rates[0]), folder),
        diagnostics=True,
    )
    run = setup_run(config)
    tokens = diagnose_tokens(run, job.size.readout_steps, progress=False)
    records = {str(r["id"]): r for r in run.data.records}
    wrong = torch.tensor([not records[i]["meta"]["box_right"] for i in tokens.token_records])
    pooled = tokens.pooled
    ht, hs = (pooled["regime"] == REGIME_NAMES.index(name) for name in ("HT", "HS"))
    right = pooled["correct"] == 1
    moved = pooled["regime_edge_check"] != REGIME_NAMES.index("HT")
    edge = pooled["information_edge"]

    def share(mask, within) -> float | None:
        return float((mask & within).sum()) / int(within.sum()) if bool(within.any()) else None

    return {
        "tokens": int(pooled["regime"].numel()),
        "box_wrong_tokens": float(wrong.double().mean()),
        "ht_box_wrong": share(wrong, ht),
        "edge_moves_ht_box_wrong": share(moved, ht & wrong),
        "edge_moves_ht_box_right": share(moved, ht & ~wrong),
        "hs_precision": share(right & wrong, hs),
        "information_edge_box_right": float(edge[~wrong].mean()) if bool((~wrong).any()) else None,
        "information_edge_box_wrong": float(edge[wrong].mean()) if bool(wrong.any()) else None,
        **{f"frac/{name}": float((pooled["regime"] == k).double().mean()) for k, name in enumerate(REGIME_NAMES)},
    }


def _work(job: Job) -> dict:
    if job.readout:
        return first_step_readout(job)
    return distill_and_evaluate(job) if job.spec else prepare_seed(job)


# --------------------------------------------------------------------------------------- the study
def run_study(out: Path, size: Size, methods: tuple[str, ...] = METHODS, workers: int = 2) -> dict:
    """Prepare every seed, choose each method's rate on seed 0's dev split at the highest rate, run
    every rate and seed at it, read the first steps, and write the tables, figure and cells."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    base = Job(out, size, size.seeds[0])
    seed0, selection_rate = size.seeds[0], max(size.rates)
    label = lambda spec: toy.parse_method(spec)[0]  # noqa: E731
    selection_jobs = [
        dataclasses.replace(base, seed=seed0, rate=selection_rate, spec=spec, lr=lr, on_dev=True)
        for lr in size.learning_rates
        for spec in methods
    ]
    # The first two seeds' preparations side by side; the others beside seed 0's selection runs.
    first, rest = (
        [dataclasses.replace(base, seed=s) for s in size.seeds[:2]],
        [dataclasses.replace(base, seed=s) for s in size.seeds[2:]],
    )
    prepared = dict(zip(size.seeds[:2], trust.run_jobs(first, workers, _work)))
    done = trust.run_jobs(rest + selection_jobs, workers, _work)
    prepared.update(zip(size.seeds[2:], done[: len(rest)]))
    for seed, r in prepared.items():
        print(
            f"seed {seed}: student {r['student_plain']['accuracy']:.3f} (text-only majority "
            f"{r['majority']['accuracy']:.3f}), teacher without boxes {r['teacher_plain']['accuracy']:.3f}, with "
            + ", ".join(f"{t}: {r[f'teacher_priv_{t}']['accuracy']:.3f}" for t in map(_rate_tag, size.rates)),
            flush=True,
        )
    dev: dict[str, dict[float, dict]] = {}
    for job, result in zip(selection_jobs, done[len(rest) :]):
        dev.setdefault(label(job.spec), {})[job.lr] = result
    chosen = {name: trust.choose_lr(per_lr) for name, per_lr in dev.items()}
    selection = {
        "seed": seed0,
        "rate": selection_rate,
        "learning_rates": list(size.learning_rates),
        "dev_accuracy": {
            name: {f"{lr:g}": r["dev"]["accuracy"] for lr, r in per_lr.items()} for name, per_lr in dev.items()
        },
        "chosen": chosen,
    }
    (out / "selection.json").write_text(json.dumps(selection, indent=2))
    final_jobs = [
        dataclasses.replace(base, seed=seed, rate=rate, spec=spec, lr=chosen[label(spec)])
        for seed in size.seeds
        for rate in size.rates
        for spec in methods
        if not (seed == seed0 and rate == selection_rate)
    ]
    results: dict[str, dict[str, dict[int, dict]]] = {
        _rate_tag(selection_rate): {name: {seed0: per_lr[chosen[name]]} for name, per_lr in dev.items()}
    }
    for job, result in zip(final_jobs, trust.run_jobs(final_jobs, workers, _work)):
        results.setdefault(_rate_tag(job.rate), {}).setdefault(label(job.spec), {})[job.seed] = result
    readout_jobs = [
        dataclasses.replace(base, seed=s, rate=rate, readout=True) for rate in size.rates for s in size.seeds
    ]
    readouts: dict[str, dict[int, dict]] = {}
    for job, result in zip(readout_jobs, trust.run_jobs(readout_jobs, workers, _work)):
        readouts.setdefault(_rate_tag(job.rate), {})[job.seed] = result
    payload = json.loads(
        json.dumps(
            {
                "size": dataclasses.asdict(size),
                "rates": list(size.rates),
                "prepared": prepared,
                "selection": selection,
                "results": {t: results[t] for t in map(_rate_tag, size.rates)},
                "readout": readouts,
                "minutes": (time.perf_counter() - started) / 60,
            }
        )
    )
    text = tables(payload)
    (out / "results.md").write_text(text, encoding="utf-8")
    (out / "results.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")
    plot(out / "boxes_lie.png", payload)
    (out / "boxes_lie_study.json").write_text(json.dumps(study_summary(payload), indent=2) + "\n", encoding="utf-8")
    print(text)
    return payload


# ------------------------------------------------------------------------------ tables and cells
def _values(runs: dict, key) -> list[float]:
    return [key(r) for _, r in sorted(runs.items(), key=lambda kv: int(kv[0]))]


def _get(report: dict, subset: str | None) -> float | None:
    """Accuracy overall, on a question type or on a subset; None where it has no question (no
    box-wrong question at rate 0)."""
    if subset is None:
        return report["accuracy"]
    return report["per_subset"].get(subset, report["per_type"].get(subset))


def tables(payload: dict) -> str:
    fmt, size, selection = toy.mean_std, payload["size"], payload["selection"]
    prepared = list(payload["prepared"].values())
    text = (
        f"# When the boxes lie (tiny Qwen3-VL, grid scenes)\n\nSeeds {size['seeds']}; {size['train_scenes']} "
        f"training, {size['dev_scenes']} dev and {size['heldout_scenes']} held-out scenes; teacher "
        f"{size['teacher_sft_steps']} supervised steps, student {size['student_sft_steps']}; {size['steps']} "
        f"distillation steps; learning rate per method chosen on seed {selection['seed']}'s dev split at rate "
        f"{selection['rate']:g}; {payload['minutes']:.1f} min this invocation.\n\n"
        "## The models at the start (held-out scenes, greedy)\n\n| model | overall | "
        + " | ".join(grid.QUESTION_TYPES)
        + " |\n|---|---|"
        + "---|" * len(grid.QUESTION_TYPES)
        + "\n"
    )
    rows = [
        ("text-only (majority answer per type)", "majority"),
        ("student, no boxes", "student_plain"),
        ("student with ground-truth boxes", "student_priv"),
        ("teacher, no boxes", "teacher_plain"),
    ]
    rows += [(f"teacher with the boxes at rate {r:g}", f"teacher_priv_{_rate_tag(r)}") for r in payload["rates"]]
    for name, key in rows:
        text += (
            f"| {name} | {fmt([p[key]['accuracy'] for p in prepared])} | "
            + " | ".join(fmt([p[key]["per_type"].get(t, float("nan")) for p in prepared]) for t in grid.QUESTION_TYPES)
            + " |\n"
        )
    text += "\n## The detector's boxes (share of questions whose boxes give a wrong answer; images skipped)\n\n"
    text += "| rate | train | held-out | images without predictions (skipped) |\n|---|---|---|---|\n"
    for r in payload["rates"]:
        builds = [p["builds"][_rate_tag(r)] for p in prepared]
        text += (
            f"| {r:g} | {fmt([b['box_wrong_share']['train'] for b in builds])} | "
            f"{fmt([b['box_wrong_share']['heldout'] for b in builds])} | "
            f"{fmt([float(b['skipped_images']) for b in builds])} |\n"
        )
    text += (
        f"\n## Learning rate, chosen on the dev split (seed {selection['seed']}, rate {selection['rate']:g}; the "
        "chosen in bold)\n\n| method | "
        + " | ".join(f"lr {lr:g}" for lr in selection["learning_rates"])
        + " |\n|---|"
        + "---|" * len(selection["learning_rates"])
        + "\n"
    )
    for name, per_lr in selection["dev_accuracy"].items():
        chosen = f"{selection['chosen'][name]:g}"
        text += (
            f"| {name} | "
            + " | ".join(f"**{v:.3f}**" if lr == chosen else f"{v:.3f}" for lr, v in per_lr.items())
            + " |\n"
        )
    text += (
        "\n## After distillation (mean ± std over seeds; no boxes at evaluation)\n\nHeld-out scenes: accuracy overall, "
        "per question type and per subset (questions whose detector boxes give the true answer / lie). Training "
        "questions: the same subsets (did the student learn the detector's mistakes?).\n\n| rate | method | "
        "held-out | minus vanilla OPD | "
        + " | ".join(grid.QUESTION_TYPES)
        + " | held-out, box right | held-out, box wrong | train, box right | train, box wrong | guard alarms |\n"
        "|---|---|---|---|" + "---|" * len(grid.QUESTION_TYPES) + "---|---|---|---|---|\n"
    )
    for tag, per_label in payload["results"].items():
        vanilla = per_label.get("vanilla_opd", {})
        for name, runs in per_label.items():
            held = _values(runs, lambda r: r["heldout"]["accuracy"])
            gain = (
                [h - vanilla[s]["heldout"]["accuracy"] for s, h in zip(sorted(runs, key=int), held)] if vanilla else []
            )
            alarms = sum(r["training"]["collapse_alarm_step"] is not None for r in runs.values())
            text += (
                f"| {tag[1:]} | {name} | {fmt(held)} | {fmt(gain) if name != 'vanilla_opd' and gain else ''} | "
                + " | ".join(fmt(_values(runs, lambda r, t=t: _get(r["heldout"], t))) for t in grid.QUESTION_TYPES)
                + " | "
                + " | ".join(
                    fmt(_values(runs, lambda r, s=s, split=split: _get(r[split], s)))
                    for split in ("heldout", "train")
                    for s in SUBSETS
                )
                + f" | {alarms}/{len(runs)} |\n"
            )
    text += (
        "\n## The first steps, read token by token (DOPD's routing, no training; mean ± std over seeds)\n\n| | "
        + " | ".join(f"rate {r:g}" for r in payload["rates"])
        + " |\n|---|"
        + "---|" * len(payload["rates"])
        + "\n"
    )
    readout_rows = {
        "LH / LL / HT / HS (paper's rule)": lambda rs: " / ".join(
            fmt([r[f"frac/{g}"] for r in rs]) for g in ("LH", "LL", "HT", "HS")
        ),
        "tokens from records whose boxes lie": lambda rs: fmt([r["box_wrong_tokens"] for r in rs]),
        "HT tokens from records whose boxes lie": lambda rs: _cell([r["ht_box_wrong"] for r in rs]),
        "of those, moved by the edge check": lambda rs: _cell([r["edge_moves_ht_box_wrong"] for r in rs]),
        "HT tokens of box-right records moved by the edge check": lambda rs: _cell(
            [r["edge_moves_ht_box_right"] for r in rs]
        ),
        "HS precision (right response, lying boxes)": lambda rs: _cell([r["hs_precision"] for r in rs]),
        "information edge, box right / box wrong (nats)": lambda rs: (
            _cell([r["information_edge_box_right"] for r in rs])
            + " / "
            + _cell([r["information_edge_box_wrong"] for r in rs])
        ),
    }
    for name, cell in readout_rows.items():
        text += (
            f"| {name} | "
            + " | ".join(cell(list(payload["readout"][_rate_tag(r)].values())) for r in payload["rates"])
            + " |\n"
        )
    return text


def _cell(values: list[float | None]) -> str:
    kept = [v for v in values if v is not None]
    return toy.mean_std(kept) if kept else "n/a"


def study_summary(payload: dict) -> dict:
    """The measured cells `dopd diagnose` quotes (dopd_vl/assets/boxes_lie_study.json)."""
    cells = []
    prepared = list(payload["prepared"].values())
    for r in payload["rates"]:
        tag = _rate_tag(r)
        per_label = payload["results"][tag]
        vanilla = per_label.get("vanilla_opd")
        cells.append(
            {
                "rate": r,
                "box_wrong_share": [p["builds"][tag]["box_wrong_share"]["train"] for p in prepared],
                "teacher_priv_accuracy": [p[f"teacher_priv_{tag}"]["accuracy"] for p in prepared],
                "teacher_plain_accuracy": [p["teacher_plain"]["accuracy"] for p in prepared],
                "student_accuracy": [p["student_plain"]["accuracy"] for p in prepared],
                "gain_over_vanilla": {
                    name: [
                        runs[s]["heldout"]["accuracy"] - vanilla[s]["heldout"]["accuracy"]
                        for s in sorted(runs, key=int)
                    ]
                    for name, runs in per_label.items()
                    if vanilla is not None and name != "vanilla_opd"
                },
                "heldout_accuracy": {
                    name: _values(runs, lambda x: x["heldout"]["accuracy"]) for name, runs in per_label.items()
                },
            }
        )
    return {
        "source": "examples/visual_privilege/RESULTS.md, 'When the boxes lie'",
        "scope": (
            f"tiny Qwen3-VL on grid scenes, {len(payload['size']['seeds'])} seeds, a simulated detector at rates "
            f"{', '.join(f'{r:g}' for r in payload['rates'])}"
        ),
        "cells": cells,
        "answer": outcome(cells),
        "caveat": (
            "Measured on a tiny Qwen3-VL with generated scenes and a simulated detector: a direction to check on "
            "your own data, not a prediction."
        ),
    }


def outcome(cells: list[dict]) -> str:
    """The study's outcome in one sentence, from the cells: the best method by held-out accuracy at the
    noisiest rate, and where it stands against vanilla OPD there and with the cleanest boxes."""
    noisiest, cleanest = max(cells, key=lambda c: c["rate"]), min(cells, key=lambda c: c["rate"])
    best = max(noisiest["heldout_accuracy"], key=lambda name: statistics.fmean(noisiest["heldout_accuracy"][name]))
    text = (
        f"At detector noise rate {noisiest['rate']:g} the best held-out accuracy is {best}'s "
        f"({toy.mean_std(noisiest['heldout_accuracy'][best])})"
    )
    if best == "vanilla_opd" or "vanilla_opd" not in noisiest["heldout_accuracy"]:
        return text + "."

    def said(gains: list[float]) -> str:
        mean, std = statistics.fmean(gains), statistics.stdev(gains) if len(gains) > 1 else 0.0
        within = "more than" if abs(mean) > std else "within"
        return f"{mean:+.3f} ± {std:.3f} from vanilla OPD, {within} one seed-to-seed std"

    return (
        text + f", {said(noisiest['gain_over_vanilla'][best])}; with the boxes at rate {cleanest['rate']:g} it ends "
        f"{said(cleanest['gain_over_vanilla'][best])}."
    )


def plot(path: Path, payload: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = payload["rates"]
    names = list(payload["results"][_rate_tag(rates[0])])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        for ax, key in zip(axes, (lambda r: r["heldout"]["accuracy"], lambda r: _get(r["train"], "box_wrong"))):
            values = [[v for v in _values(payload["results"][_rate_tag(r)][name], key) if v is not None] for r in rates]
            means = [statistics.fmean(v) if v else float("nan") for v in values]
            ax.plot(rates, means, marker="o", label=name)
    axes[0].set(title="held-out accuracy (no boxes)", xlabel="detector noise rate", ylabel="accuracy")
    axes[1].set(title="training questions whose boxes lie", xlabel="detector noise rate", ylabel="accuracy")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments (the docs' commands are checked against it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/visual_privilege/boxes_lie")
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (one per core)")
    return parser


def cli() -> None:
    args = build_parser().parse_args()
    logging.basicConfig(level=logging.WARNING)
    run_study(Path(args.out), SIZES[args.size], workers=args.workers)


if __name__ == "__main__":
    cli()
