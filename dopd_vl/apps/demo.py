"""`dopd demo`: the whole story offline on CPU in a few minutes (`make demo`).

1. Generated scenes with exact boxes -> COCO JSON -> the real grounding builder -> train / eval JSONL.
2. Tiny Qwen3-VL student and teacher built from configs with the shipped Qwen tokenizer (or the
   models you pass), saved and loaded with from_pretrained like any checkpoint.
3. A built tiny teacher is briefly fine-tuned on the answers with the boxes in its prompt, so it
   has a privileged edge for routing to separate, and a built student is warmed up on the answers
   (mostly without boxes), so it starts as a weak model, not as random weights (real models come
   pretrained and skip this).
4. Accuracy before: student (plain view); teacher with and without the privileged context.
5. DOPD training of the student through the same Trainer as `dopd train`, with a progress bar.
6. Accuracy after, plots of the run, the token routing view, the final student and summary.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dopd_vl.apps.plots import plot_run, read_metrics
from dopd_vl.apps.routing_page import route_records, write_routing_html
from dopd_vl.apps.scene_task import finetune_model, heldout_accuracy, make_demo_dataset, split_by_image
from dopd_vl.data.sources import load_records
from dopd_vl.errors import DopdError
from dopd_vl.method.objectives import ObjectiveConfig
from dopd_vl.method.routing import REGIME_NAMES
from dopd_vl.modality.adapters import make_adapter
from dopd_vl.models.folders import load_tokenizer
from dopd_vl.models.loading import (
    check_same_tokenizer,
    eos_token_ids,
    load_model,
    load_processing,
    never_sampled_token_ids,
    resolve_device,
)
from dopd_vl.models.tiny import build_tiny_qwen3_vl
from dopd_vl.training.config import TrainConfig
from dopd_vl.training.rollout import RolloutConfig, sample_responses
from dopd_vl.training.trainer import Trainer

logger = logging.getLogger(__name__)
_MARKER = ".dopd-demo"

__all__ = ["DemoConfig", "run_demo"]


@dataclass
class DemoConfig:
    num_images: int = 32
    eval_images: int = 8
    """Scenes held out for evaluation (their questions never appear in training)."""
    teacher_sft_steps: int = 90
    teacher_sft_views: tuple[str, ...] = ("teacher_priv",)
    """The teacher learns the answers with the boxes only, so its edge is largely privileged."""
    student_sft_steps: int = 100
    student_sft_views: tuple[str, ...] = ("student", "student", "student_priv")
    """A warm-up on answers (mostly without boxes), so the built student starts as a weak model
    that knows the answer format (as a real pretrained student would), not as random weights."""
    top_k: int = 32
    topk_source: str = "student"
    steps: int = 24
    """DOPD optimizer steps."""
    batch_size: int = 4
    """Prompts per step; each gets `num_generations` responses."""
    num_generations: int = 2
    max_new_tokens: int = 6
    lr: float = 1e-4
    privileged_student: str = "initial"
    """A frozen privileged student: tiny, weak students collapse with the paper's live one
    (examples/toy_privilege/RESULTS.md); `live` is the paper's setting."""
    routing_records: int = 6
    seed: int = 0
    device: str = "auto"
    """Where every model of the demo runs: auto (the GPU when present), cpu, cuda or cuda:N."""
    dtype: str = "auto"
    """auto: bfloat16 on GPUs that support it, float32 on CPU."""


def run_demo(
    out_dir: str | Path = "demo_out",
    seed: int = 0,
    student: str | None = None,
    teacher: str | None = None,
    steps: int | None = None,
    num_images: int | None = None,
    config: DemoConfig | None = None,
    device: str | None = None,
    dtype: str | None = None,
    say: Callable[[str], None] = logger.info,
) -> dict:
    """The demo in its six phases (the module's docstring); `say` reports progress (`dopd demo`
    passes `print`). Returns the summary also written to OUT/summary.json."""
    config = config or DemoConfig(seed=seed)
    config.steps = steps or config.steps
    config.num_images = num_images or config.num_images
    config.device, config.dtype = device or config.device, dtype or config.dtype
    resolve_device(config.device)  # a bad --device fails before any work
    started = time.perf_counter()
    out = _fresh_demo_folder(Path(out_dir))
    torch.manual_seed(config.seed)

    say(f"[1/6] dataset: {config.num_images} generated scenes -> COCO JSON -> dopd build grounding")
    data, train, evaluation, counts = _dataset(out, config, say)
    say("[2/6] models")
    student_path, teacher_path = _models(out, config, train, student, teacher, say)
    say("[3/6] accuracy before training (held-out scenes)")
    before = _accuracy_before(student_path, teacher_path, evaluation, config, say)
    say(f"[4/6] DOPD training: {config.steps} steps")
    run_dir, student_out, objective = _train(out, config, student_path, teacher_path, train, evaluation)
    say("[5/6] accuracy after training")
    after = {"student": heldout_accuracy(student_out, evaluation, config)}
    say(f"      student                {after['student']['accuracy']:.2f}  {after['student']['per_type']}")
    say("[6/6] plots, routing view, summary")
    plots = plot_run(run_dir, out / "plots")
    routing = _routing_page(out, config, student_out, teacher_path, evaluation, objective)

    metrics = read_metrics(run_dir)
    mean_fractions = {r: sum(m[f"frac/{r}"] for m in metrics) / len(metrics) for r in REGIME_NAMES}
    summary = {
        "config": asdict(config),
        "dataset": {"data": str(data), **counts},
        "student": student_path,
        "teacher": teacher_path,
        "accuracy_before": before,
        "accuracy_after": after,
        "regime_fractions_mean": mean_fractions,
        "last_step": {k: v for k, v in metrics[-1].items() if not k.startswith("time/")},
        "seconds": round(time.perf_counter() - started, 1),
        "artifacts": {
            "metrics": str(run_dir / "metrics.jsonl"),
            "plots": [str(p) for p in plots],
            "routing_view": str(routing),
            "final_student": str(student_out),
            "summary": str(out / "summary.md"),
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    (out / "summary.md").write_text(_summary_markdown(summary), encoding="utf-8")
    fractions = ", ".join(f"{r} {v:.2f}" for r, v in mean_fractions.items())
    say(f"\nregime fractions (mean over steps): {fractions}")
    say(
        f"student accuracy on held-out scenes: {before['student']['accuracy']:.2f} before -> "
        f"{after['student']['accuracy']:.2f} after "
        f"(teacher {before['teacher_with_boxes']['accuracy']:.2f} with boxes, "
        f"{before['teacher_without_boxes']['accuracy']:.2f} without)"
    )
    files = "summary.md, routing.html, plots/, run/metrics.jsonl, student/"
    say(f"everything is in {out}/ ({files}); {summary['seconds']:.0f} s")
    return summary


# ------------------------------------------------------------------------------ the phases
def _fresh_demo_folder(out: Path) -> Path:
    """OUT, new or an earlier demo's (replaced); any other non-empty folder is refused."""
    if out.exists() and any(out.iterdir()):
        if not (out / _MARKER).exists():
            raise DopdError(f"{out} exists and is not a demo folder; pass --out with a new or earlier demo folder")
        shutil.rmtree(out)  # an earlier demo's folder: start afresh
    out.mkdir(parents=True, exist_ok=True)
    (out / _MARKER).write_text("written by dopd demo; the next demo run with this --out replaces the folder\n")
    return out


def _dataset(out: Path, config: DemoConfig, say) -> tuple[Path, Path, Path, dict]:
    """[1/6] generated scenes built into data.jsonl, split by scene into train / eval."""
    data = make_demo_dataset(out / "data", config.num_images, config.seed)
    train, evaluation = split_by_image(data, config.eval_images)
    counts = {name: sum(1 for _ in open(p, encoding="utf-8")) for name, p in (("train", train), ("eval", evaluation))}
    say(f"      {data} ({counts['train']} train / {counts['eval']} eval questions)")
    return data, train, evaluation, counts


def _models(out: Path, config: DemoConfig, train: Path, student: str | None, teacher: str | None, say):
    """[2/6] the given models, or tiny ones built offline: a student warmed up on the answers
    (mostly without boxes) and a teacher taught to read the boxes."""
    tokenizer = load_tokenizer()
    student_path = student
    if not student_path:
        student_path = str(build_tiny_qwen3_vl(out / "models" / "student", tokenizer=tokenizer, seed=config.seed))
        if config.student_sft_steps:
            say(
                f"      warming up the tiny student on answers, mostly without boxes ({config.student_sft_steps} "
                f"supervised steps)"
            )
            finetune_model(
                Path(student_path), train, config.student_sft_steps, config.student_sft_views, config.seed, config
            )
    teacher_path = teacher
    if not teacher_path:
        shape = dict(hidden_size=96, num_layers=3, num_heads=6, intermediate_size=192)
        teacher_path = str(
            build_tiny_qwen3_vl(out / "models" / "teacher", tokenizer=tokenizer, seed=config.seed + 1, **shape)
        )
        say(f"      teaching the tiny teacher to read the boxes ({config.teacher_sft_steps} supervised steps)")
        finetune_model(
            Path(teacher_path), train, config.teacher_sft_steps, config.teacher_sft_views, config.seed + 1, config
        )
    say(f"      student {student_path}\n      teacher {teacher_path}")
    return student_path, teacher_path


def _accuracy_before(student_path: str, teacher_path: str, evaluation: Path, config: DemoConfig, say) -> dict:
    """[3/6] held-out accuracy of the student and of the teacher with and without the boxes."""
    before = {
        "student": heldout_accuracy(student_path, evaluation, config),
        "teacher_with_boxes": heldout_accuracy(teacher_path, evaluation, config, privileged=True),
        "teacher_without_boxes": heldout_accuracy(teacher_path, evaluation, config),
    }
    for name, report in before.items():
        say(f"      {name:22s} {report['accuracy']:.2f}  {report['per_type']}")
    return before


def _train(out: Path, config: DemoConfig, student_path: str, teacher_path: str, train: Path, evaluation: Path):
    """[4/6] DOPD through the same Trainer as `dopd train`; the final student copied to OUT/student."""
    run_dir = out / "run"
    base = TrainConfig()
    train_config = dataclasses.replace(
        base,
        student=dataclasses.replace(base.student, name_or_path=student_path),
        teacher=dataclasses.replace(base.teacher, name_or_path=teacher_path, dtype=config.dtype),
        data=dataclasses.replace(base.data, train=str(train), eval=str(evaluation)),
        output_dir=str(run_dir),
        max_steps=config.steps,
        save_steps=config.steps,
        save_total_limit=1,
        seed=config.seed,
        objective=ObjectiveConfig(
            name="dopd",
            privileged_student=config.privileged_student,
            top_k=config.top_k,
            topk_source=config.topk_source,
        ),
        rollout=dataclasses.replace(
            base.rollout, num_generations=config.num_generations, max_new_tokens=config.max_new_tokens
        ),
        optim=dataclasses.replace(base.optim, lr=config.lr, batch_size=config.batch_size, warmup_steps=2),
        device=config.device,
    )
    final = Trainer(train_config).train()
    student_out = out / "student"
    shutil.copytree(final, student_out)
    return run_dir, student_out, train_config.objective


def _routing_page(
    out: Path, config: DemoConfig, student_out: Path, teacher_path: str, evaluation: Path, objective: ObjectiveConfig
) -> Path:
    """[6/6] the trained student answers held-out records; each token coloured by its regime."""
    s_model = load_model(student_out, config.dtype, device=config.device).eval()
    t_model = load_model(teacher_path, config.dtype, device=config.device).eval()
    s_proc, t_proc = load_processing(student_out), load_processing(teacher_path)
    adapters = {
        "student": make_adapter(s_proc, image_root=evaluation.parent),
        "teacher": make_adapter(t_proc, image_root=evaluation.parent),
    }
    records = load_records(evaluation)[: config.routing_records]
    rollout = sample_responses(
        s_model,
        adapters["student"],
        records,
        RolloutConfig(num_generations=1, max_new_tokens=config.max_new_tokens),
        eos_token_ids(s_proc, s_model),
        never_sampled_token_ids(s_proc, s_model),
    )
    vocab = check_same_tokenizer(s_proc, t_proc, s_model, t_model)
    routed, thresholds = route_records(s_model, t_model, adapters, records, rollout.responses, vocab, objective)
    return write_routing_html(
        out / "routing.html",
        routed,
        thresholds,
        image_root=evaluation.parent,
        title="DOPD token routing (demo student, held-out scenes)",
        objective_config=objective,
    )


def _summary_markdown(s: dict) -> str:
    from dopd_vl.method.routing import REGIME_NAMES

    def row(name: str, report: dict) -> str:
        types = " | ".join(f"{report['per_type'].get(t, float('nan')):.2f}" for t in ("count", "exists", "relation"))
        return f"| {name} | {report['accuracy']:.2f} | {types} |"

    last = s["last_step"]
    lines = [
        "# dopd demo summary",
        "",
        f"Dataset: `{s['dataset']['data']}`: {s['dataset']['train']} training and {s['dataset']['eval']} held-out "
        f"questions about generated scenes, "
        "built by the grounding builder from COCO-format boxes.",
        "",
        f"Student `{s['student']}`, teacher `{s['teacher']}`; {s['config']['steps']} DOPD steps; {s['seconds']:.0f} s "
        f"in all.",
        "",
        "## Accuracy on held-out scenes (greedy, normalised matching)",
        "",
        "| model | all | count | exists | relation |",
        "|---|---|---|---|---|",
        row("student before", s["accuracy_before"]["student"]),
        row("student after DOPD", s["accuracy_after"]["student"]),
        row("teacher with boxes (privileged)", s["accuracy_before"]["teacher_with_boxes"]),
        row("teacher without boxes", s["accuracy_before"]["teacher_without_boxes"]),
        "",
        "The student never sees the boxes; the gap between the teacher with and without them is the part of its edge "
        "that is "
        "privileged information, which DOPD's routing is meant not to push onto the student at full strength.",
        "",
        "## Routing",
        "",
        "| regime | mean token fraction | last step fraction | last step mean A |",
        "|---|---|---|---|",
        *[
            f"| {r} | {s['regime_fractions_mean'][r]:.3f} | {last[f'frac/{r}']:.3f} | {last[f'A/{r}']:.3f} |"
            for r in REGIME_NAMES
        ],
        "",
        f"Last step thresholds: A {last['threshold/A']:.3f}, q_S {last['threshold/q_student']:.3f}, q_T "
        f"{last['threshold/q_teacher']:.3f}; "
        f"student entropy {last['entropy/student']:.3f} nats.",
        "",
        "## Files",
        "",
        f"- `{s['artifacts']['metrics']}`: every metric of every step (docs/design.md §4.5 names)",
        *[f"- `{p}`" for p in s["artifacts"]["plots"]],
        f"- `{s['artifacts']['routing_view']}`: response tokens coloured by regime; hover for A, q_S, q_T",
        f"- `{s['artifacts']['final_student']}`: the trained student (`from_pretrained`-loadable)",
        "",
        "## Next: real models on a GPU",
        "",
        "```bash",
        "dopd build grounding --format coco --images coco/train2017 --annotations "
        "coco/annotations/instances_train2017.json --out data/grounding/train.jsonl",
        "dopd train configs/qwen3vl_8b_to_2b.yaml                                 # one GPU",
        "accelerate launch --config_file configs/accelerate/ddp.yaml -m dopd_vl.cli train "
        "configs/qwen3vl_8b_to_2b.yaml  # several",
        "```",
        "",
    ]
    return "\n".join(lines)
