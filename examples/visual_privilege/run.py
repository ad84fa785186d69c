"""The paper's VLM comparison methods on the demo's generated scenes, on CPU.

    python -m examples.visual_privilege.run            # 3 seeds (<= 30 min on 2 cores)
    python -m examples.visual_privilege.run --quick    # 1 seed

A seed covers the whole pipeline: generated scenes (COCO boxes) built twice by the grounding
builder, once with boxes as text (`qwen3vl_grounding`) and once with the evidence crop (`crop`);
a tiny Qwen3-VL teacher trained on the answers with and without the boxes; a smaller tiny student
warmed up on the answers (mostly without privileged context); then every method trains from that
student for the same steps through the package's Trainer:

- vanilla_opd (plain teacher), privileged_opd (teacher with boxes), dopd (boxes, initial
  privileged student), va_opd (boxes: visual advantage = teacher with minus without them),
- vision_opd (the student itself shown the crop; `live` and `initial` self-teacher).

Everything is evaluated without privileged context on held-out scenes: greedy exact-match
accuracy, and teacher-forced on the reference answers the mean log-likelihood per answer token and
the share of answer tokens that are the model's argmax (finer than greedy accuracy, which a few
steps rarely change). Writes OUT (default runs/visual_privilege): results.md, results.json, each
seed's data / models / runs; `--reuse` keeps finished preparations and runs (e.g. to re-evaluate).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from data_builders import build_grounding, load_annotations, write_shape_scenes
from dopd_vl import (
    DemoConfig,
    ObjectiveConfig,
    TrainConfig,
    Trainer,
    answer_ids,
    build_tiny_qwen3_vl,
    build_view,
    finetune_model,
    heldout_accuracy,
    load_model,
    load_processing,
    load_records,
    load_tokenizer,
    make_adapter,
    output_embedding_weight,
    read_metrics,
    split_by_image,
    valid_response_states,
)

# label = (the objective, which privileged context the run trains with)
METHODS = {
    "vanilla_opd": (ObjectiveConfig(name="vanilla_opd"), "boxes"),
    "privileged_opd": (ObjectiveConfig(name="privileged_opd"), "boxes"),
    "dopd_initial": (ObjectiveConfig(name="dopd", privileged_student="initial"), "boxes"),
    "va_opd": (ObjectiveConfig(name="va_opd"), "boxes"),
    "vision_opd": (ObjectiveConfig(name="vision_opd", privileged_student="live"), "crop"),
    "vision_opd_initial": (ObjectiveConfig(name="vision_opd", privileged_student="initial"), "crop"),
}


@dataclass
class Size:
    seeds: tuple[int, ...]
    num_images: int = 64
    eval_images: int = 16
    teacher_sft_steps: int = 150
    student_sft_steps: int = 100
    steps: int = 40
    lr: float = 1e-3


SIZES = {
    "full": Size((0, 1, 2)),
    "quick": Size((0,)),
    "smoke": Size((0,), num_images=6, eval_images=2, teacher_sft_steps=2, student_sft_steps=2, steps=2),
}


@torch.no_grad()
def answer_likelihood(model_dir: Path | str, data: Path) -> dict:
    """Teacher-forced on the reference answers, plain view: mean log-prob per answer token (EOS
    included) and the share of answer tokens that are the model's argmax."""
    model, processing = load_model(model_dir, "float32", device="cpu").eval(), load_processing(model_dir)
    adapter = make_adapter(processing, image_root=data.parent)
    records = load_records(data)
    total, hits, count = 0.0, 0, 0
    for start in range(0, len(records), 16):
        batch = records[start : start + 16]
        view = build_view(adapter, "student", batch, [answer_ids(adapter.tokenizer, r) for r in batch])
        hidden, ids = valid_response_states(model, view)
        logp = (hidden @ output_embedding_weight(model).T).float().log_softmax(-1)
        total += logp.gather(1, ids[:, None]).sum().item()
        hits += int((logp.argmax(-1) == ids).sum())
        count += ids.numel()
    return {"answer_logprob": total / count, "answer_token_accuracy": hits / count}


def _report(model_dir: Path | str, data: Path, demo: DemoConfig, privileged: bool = False) -> dict:
    report = heldout_accuracy(model_dir, data, demo, privileged)
    if not privileged:
        report.update(answer_likelihood(model_dir, data))
    return report


def prepare(out: Path, size: Size, seed: int, reuse: bool = False) -> dict:
    """Scenes -> boxes and crop datasets (same questions, split by scene); teacher and student."""
    saved = out / "prepared.json"
    if reuse and saved.exists():
        prepared = json.loads(saved.read_text())
        for key, model in (("student_start", prepared["student"]), ("teacher_without_boxes", prepared["teacher"])):
            if "answer_logprob" not in prepared["reports"][key]:  # prepared by an earlier version
                prepared["reports"][key].update(answer_likelihood(model, Path(prepared["data"]["boxes"]["eval"])))
        saved.write_text(json.dumps(prepared, indent=2))
        return prepared
    images, annotations = write_shape_scenes(out / "scenes", size.num_images, seed)
    data = {}
    for name, fmt in (("boxes", "qwen3vl_grounding"), ("crop", "crop")):
        path = out / name / "data.jsonl"
        build_grounding(load_annotations("coco", images, annotations), path, seed=seed, privileged_format=fmt)
        data[name] = dict(zip(("train", "eval"), split_by_image(path, size.eval_images)))
    demo = DemoConfig(seed=seed, device="cpu", dtype="float32")
    tokenizer = load_tokenizer()
    teacher = build_tiny_qwen3_vl(
        out / "models" / "teacher",
        tokenizer=tokenizer,
        hidden_size=96,
        num_layers=3,
        num_heads=6,
        intermediate_size=192,
        seed=seed + 1,
    )
    student = build_tiny_qwen3_vl(out / "models" / "student", tokenizer=tokenizer, seed=seed)
    print(
        f"seed {seed}: teacher {size.teacher_sft_steps} supervised steps (with and without boxes), student "
        f"{size.student_sft_steps}",
        flush=True,
    )
    finetune_model(
        teacher, data["boxes"]["train"], size.teacher_sft_steps, ("teacher_priv", "teacher_plain"), seed + 1, demo
    )
    finetune_model(student, data["boxes"]["train"], size.student_sft_steps, demo.student_sft_views, seed, demo)
    heldout = data["boxes"]["eval"]
    reports = {
        "student_start": _report(student, heldout, demo),
        "teacher_with_boxes": _report(teacher, heldout, demo, privileged=True),
        "teacher_without_boxes": _report(teacher, heldout, demo),
        "student_with_crop": _report(student, data["crop"]["eval"], demo, privileged=True),
    }
    prepared = {
        "data": {k: {s: str(p) for s, p in v.items()} for k, v in data.items()},
        "teacher": str(teacher),
        "student": str(student),
        "reports": reports,
    }
    saved.write_text(json.dumps(prepared, indent=2))
    return prepared


def distill(label: str, seed: int, prepared: dict, run_dir: Path, size: Size, reuse: bool = False) -> dict:
    objective, context = METHODS[label]
    demo = DemoConfig(seed=seed, device="cpu", dtype="float32")
    if reuse and (run_dir / "final" / "config.json").exists():  # trained earlier: evaluate only
        return _evaluated(run_dir, run_dir / "final", prepared, demo)
    base = TrainConfig()
    config = dataclasses.replace(
        base,
        student=dataclasses.replace(base.student, name_or_path=str(prepared["student"])),
        teacher=dataclasses.replace(base.teacher, name_or_path=str(prepared["teacher"])),
        data=dataclasses.replace(base.data, train=str(prepared["data"][context]["train"])),
        output_dir=str(run_dir),
        max_steps=size.steps,
        save_steps=size.steps,
        save_total_limit=1,
        seed=seed,
        device="cpu",
        objective=dataclasses.replace(objective, top_k=demo.top_k),
        rollout=dataclasses.replace(
            base.rollout, num_generations=demo.num_generations, max_new_tokens=demo.max_new_tokens
        ),
        optim=dataclasses.replace(base.optim, lr=size.lr, batch_size=demo.batch_size, warmup_steps=2),
    )
    return _evaluated(run_dir, Trainer(config).train(overwrite=True), prepared, demo)


def _evaluated(run_dir: Path, final: Path, prepared: dict, demo: DemoConfig) -> dict:
    report = _report(final, Path(prepared["data"]["boxes"]["eval"]), demo)
    rows = read_metrics(run_dir)
    tail = rows[-max(1, len(rows) // 5) :]
    report["training"] = {
        "entropy_end": statistics.mean(r["entropy/student"] for r in tail),
        "alarm": any(r.get("collapse_alarm") for r in rows),
        "response_length_end": statistics.mean(r["response_length"] for r in tail),
    }
    return report


def _fmt(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def summarise(results: dict, prepared: dict[int, dict]) -> str:
    types = ("count", "exists", "relation")
    lines = [
        "| method | accuracy (mean ± std) | "
        + " | ".join(types)
        + " | answer log-prob per token | answer token accuracy | student entropy at the end | guard alarm |",
        "|---" * (len(types) + 6) + "|",
    ]

    def row(name: str, reports: list[dict], train: list[dict] | None = None) -> str:
        cells = [_fmt([r["accuracy"] for r in reports])] + [
            _fmt([r["per_type"].get(t, float("nan")) for r in reports]) for t in types
        ]
        cells += [
            _fmt([r[k] for r in reports]) if all(k in r for r in reports) else ""
            for k in ("answer_logprob", "answer_token_accuracy")
        ]
        extra = (
            [_fmt([t["entropy_end"] for t in train]), f"{sum(t['alarm'] for t in train)}/{len(train)}"]
            if train
            else ["", ""]
        )
        return f"| {name} | " + " | ".join(cells + extra) + " |"

    seeds = sorted(prepared)
    lines.append(row("student (start)", [prepared[s]["reports"]["student_start"] for s in seeds]))
    for label, per_seed in results.items():
        lines.append(row(label, list(per_seed.values()), [r["training"] for r in per_seed.values()]))
    for name, key in (
        ("teacher with boxes", "teacher_with_boxes"),
        ("teacher without boxes", "teacher_without_boxes"),
        ("student (start) with the crop", "student_with_crop"),
    ):
        lines.append(row(name, [prepared[s]["reports"][key] for s in seeds]))
    return "\n".join(lines) + "\n"


def run(out: Path, size: Size, labels: list[str], reuse: bool = False) -> dict:
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    prepared = {seed: prepare(out / f"seed{seed}", size, seed, reuse) for seed in size.seeds}
    results: dict[str, dict[int, dict]] = {}
    for label in labels:
        for seed in size.seeds:
            report = distill(label, seed, prepared[seed], out / "runs" / f"{label}-seed{seed}", size, reuse)
            results.setdefault(label, {})[seed] = report
            print(f"{label} seed {seed}: accuracy {report['accuracy']:.3f} {report['per_type']}", flush=True)
    minutes = (time.perf_counter() - started) / 60
    text = (
        f"# VLM comparison methods on generated scenes\n\n{len(size.seeds)} seed(s), {size.num_images} scenes "
        f"({size.eval_images} held out), "
        f"{size.steps} distillation steps per method at lr {size.lr:g}, no privileged context at evaluation; "
        f"{minutes:.1f} min this invocation (2 CPU cores).\n\n" + summarise(results, prepared)
    )
    (out / "results.md").write_text(text, encoding="utf-8")
    payload = {"size": size.__dict__, "prepared": prepared, "results": results, "minutes": minutes}
    (out / "results.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")
    print("\n" + text)
    return payload


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments (the docs' commands are checked against it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/visual_privilege")
    parser.add_argument("--quick", action="store_true", help="1 seed")
    parser.add_argument("--size", choices=sorted(SIZES), help=argparse.SUPPRESS)
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS))
    parser.add_argument("--steps", type=int, help="distillation steps (default 40)")
    parser.add_argument("--lr", type=float, help="learning rate (default 1e-3)")
    parser.add_argument(
        "--reuse", action="store_true", help="reuse OUT's finished preparations and runs (evaluate only)"
    )
    return parser


def cli() -> None:
    parser = build_parser()
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    size = SIZES[args.size or ("quick" if args.quick else "full")]
    size.steps, size.lr = args.steps or size.steps, args.lr or size.lr
    run(Path(args.out), size, args.methods, args.reuse)


if __name__ == "__main__":
    cli()
