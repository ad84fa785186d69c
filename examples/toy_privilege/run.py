"""Toy experiment: the privilege illusion and DOPD against the baselines, on CPU.

    python examples/toy_privilege/run.py            # 3 seeds, the table in the README (<= 60 min, 2 cores)
    python examples/toy_privilege/run.py --quick    # 1 seed, fewer steps (<= 10 min)

Task (task.py): single-digit addition, half the problems with the second operand hidden; the
privileged context reveals it. A Qwen3-architecture teacher (4 layers, 128 wide) is trained
with and without the context; a smaller student (2 layers, 64 wide) is warmed up briefly, so it
can read the context but is weak. From that same student, every method trains for the same steps
and seeds through the package's Trainer and config; everything is evaluated without privileged
context on held-out problems through `dopd eval`.

Writes OUT (default runs/toy_privilege): results.md (table), results.json, curves.png, the runs'
metrics.jsonl and eval reports.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repository root, for `examples.toy_privilege`

from dopd_vl.cli import main as dopd  # noqa: E402
from dopd_vl.config import load_config  # noqa: E402
from dopd_vl.data import load_records  # noqa: E402
from dopd_vl.modality import make_adapter  # noqa: E402
from dopd_vl.models import build_tiny_qwen3, final_hidden_states, load_model, output_embedding_weight  # noqa: E402
from dopd_vl.sft import SFTConfig, answer_ids, supervised_finetune  # noqa: E402
from dopd_vl.trainer import Trainer  # noqa: E402
from dopd_vl.views import build_view  # noqa: E402
from examples.toy_privilege.task import build_char_tokenizer, write_split  # noqa: E402

METHODS = ("vanilla_opd", "privileged_opd", "self_distill", "uniform", "dopd")
# The investigation: a frozen initial privileged student instead of the live one, and DOPD with
# only its teacher routes (LH, HT), as config switches of the same engine.
ABLATIONS = (
    "dopd_initial=dopd;objective.privileged_student=initial",
    "self_distill_initial=self_distill;objective.privileged_student=initial",
    "dopd_noHS_LL=dopd;objective.regime_routes={HS: {enabled: false}, LL: {enabled: false}}",
)


@dataclass
class Size:
    seeds: tuple[int, ...]
    train_problems: int
    heldout_problems: int
    teacher_sft_steps: int
    student_sft_steps: int
    distill_steps: int


SIZES = {
    "full": Size((0, 1, 2), 4000, 400, 600, 130, 500),
    "quick": Size((0,), 4000, 400, 600, 130, 200),
    "smoke": Size((0,), 64, 16, 4, 2, 2),
}


def per_token_report(model_dir: Path, data: Path) -> dict:
    """Teacher-forced on the reference answers, plain view: per-position accuracy of the argmax
    and entropy of the model's distribution (answer digits 1..2, then <|im_end|>)."""
    model = load_model(model_dir).eval()
    tokenizer = build_char_tokenizer()
    adapter = make_adapter(tokenizer)
    records = load_records(data)
    correct, entropy, count = {}, {}, {}
    with torch.no_grad():
        for start in range(0, len(records), 64):
            batch = records[start : start + 64]
            view = build_view(adapter, "student", batch, [answer_ids(tokenizer, r) for r in batch])
            hidden = final_hidden_states(model, view.inputs)
            hidden = hidden.gather(1, view.response_positions[..., None].expand(-1, -1, hidden.shape[-1]))
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
        "position_accuracy": [correct[t] / count[t] for t in sorted(count)],
        "position_entropy": [entropy[t] / count[t] for t in sorted(count)],
    }


def evaluate(model_dir: Path, data: Path, out: Path, privileged: bool = False) -> dict:
    """`dopd eval` (greedy, no privileged context unless asked) plus the per-token report."""
    args = ["eval", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--max-new-tokens", "4", "--batch-size", "64"]
    if dopd(args + (["--privileged"] if privileged else [])) != 0:
        raise RuntimeError(f"dopd eval failed for {model_dir}")
    report = json.loads(out.read_text())
    summary = {"accuracy": report["accuracy"], "per_type": {k: v["accuracy"] for k, v in report["per_type"].items()}}
    if not privileged:
        summary.update(per_token_report(model_dir, data))
    return summary


def prepare(out: Path, size: Size) -> tuple[Path, Path, Path, Path]:
    """Data, the teacher (trained with and without the context) and the warmed-up student."""
    tokenizer = build_char_tokenizer()
    train = write_split(out / "data" / "train.jsonl", size.train_problems, seed=1000)
    heldout = write_split(out / "data" / "heldout.jsonl", size.heldout_problems, seed=2000)
    adapter = make_adapter(tokenizer)
    records = load_records(train)
    teacher = build_tiny_qwen3(out / "models" / "teacher", tokenizer=tokenizer, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                               intermediate_size=512, lm_head_rows=0, seed=1)
    student = build_tiny_qwen3(out / "models" / "student", tokenizer=tokenizer, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                               intermediate_size=256, lm_head_rows=0, seed=2)
    for folder, config in (
        (teacher, SFTConfig(steps=size.teacher_sft_steps, batch_size=64, lr=1e-3, views=("teacher_priv", "teacher_plain"), seed=1)),
        (student, SFTConfig(steps=size.student_sft_steps, batch_size=64, lr=1e-3, views=("student", "student_priv"), seed=2)),
    ):
        model = load_model(folder)
        print(f"supervised training of {folder.name}: {config.steps} steps on {config.views}", flush=True)
        supervised_finetune(model, adapter, records, len(tokenizer), config)
        model.save_pretrained(folder, safe_serialization=True)
    return train, heldout, teacher, student


def distill(method: str, seed: int, train: Path, teacher: Path, student: Path, run_dir: Path, steps: int, overrides: tuple[str, ...] = ()) -> Path:
    config = load_config(HERE / "config.yaml", [
        f"student.name_or_path={student}", f"teacher.name_or_path={teacher}", f"data.train={train}", f"output_dir={run_dir}",
        f"objective.name={method}", f"seed={seed}", f"max_steps={steps}", *overrides,
    ])
    return Trainer(config).train()


def parse_method(spec: str) -> tuple[str, str, tuple[str, ...]]:
    """`name` or `label=name;key=value;...`: an ablation is a method plus config overrides."""
    label, _, rest = spec.partition("=") if ";" in spec else (spec, "", spec)
    name, *overrides = rest.split(";")
    return (label if ";" in spec else name), name, tuple(overrides)


def summarise(results: dict, baseline: dict, teachers: dict) -> tuple[str, dict]:
    student_acc, teacher_acc = baseline["accuracy"], teachers["plain"]["accuracy"]
    rows, table = [], {}
    header = ("| method | accuracy (mean ± std) | visible | hidden digit | token accuracy | answer entropy (nats) | gap recovered |\n"
              "|---|---|---|---|---|---|---|")

    def fmt(values: list[float]) -> str:
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"

    rows.append(f"| student (start) | {baseline['accuracy']:.3f} | {baseline['per_type'].get('visible', 0):.3f} | {baseline['per_type'].get('hidden_digit', 0):.3f} | "
                f"{baseline['token_accuracy']:.3f} | {statistics.mean(baseline['position_entropy']):.3f} | 0 |")
    for method, per_seed in results.items():
        acc = [r["accuracy"] for r in per_seed]
        gap = [(a - student_acc) / (teacher_acc - student_acc) if teacher_acc != student_acc else float("nan") for a in acc]
        table[method] = {"accuracy": acc, "gap_recovered": gap}
        rows.append(
            f"| {method} | {fmt(acc)} | {fmt([r['per_type'].get('visible', 0) for r in per_seed])} | {fmt([r['per_type'].get('hidden_digit', 0) for r in per_seed])} | "
            f"{fmt([r['token_accuracy'] for r in per_seed])} | {fmt([statistics.mean(r['position_entropy']) for r in per_seed])} | {fmt(gap)} |"
        )
    for name, report in (("teacher, no context", teachers["plain"]), ("teacher, with context", teachers["privileged"])):
        rows.append(f"| {name} | {report['accuracy']:.3f} | {report['per_type'].get('visible', 0):.3f} | {report['per_type'].get('hidden_digit', 0):.3f} | | | |")
    return header + "\n" + "\n".join(rows), table


def plot_curves(out: Path, methods: list[str], seeds: tuple[int, ...]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dopd_vl.plots import read_metrics

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for method in methods:
        runs = [read_metrics(out / "runs" / f"{method}-seed{s}") for s in seeds]
        steps = [m["step"] for m in runs[0]]
        for ax, key in zip(axes[:2], ("accuracy", "entropy/student")):
            mean = [statistics.mean(r[i].get(key, float("nan")) for r in runs) for i in range(len(steps))]
            window = max(1, len(mean) // 20)
            smooth = [statistics.mean(mean[max(0, i - window + 1) : i + 1]) for i in range(len(mean))]
            ax.plot(steps, smooth, label=method)
    dopd_runs = [read_metrics(out / "runs" / f"dopd-seed{s}") for s in seeds] if "dopd" in methods else []
    if dopd_runs:
        steps = [m["step"] for m in dopd_runs[0]]
        for regime in ("LH", "LL", "HT", "HS"):
            axes[2].plot(steps, [statistics.mean(r[i][f"frac/{regime}"] for r in dopd_runs) for i in range(len(steps))], label=regime)
    axes[0].set(title="rollout accuracy (training prompts, T=1, smoothed)", xlabel="step")
    axes[1].set(title="student entropy at response tokens (nats, smoothed)", xlabel="step")
    axes[2].set(title="DOPD regime occupancy", xlabel="step", ylim=(0, 1))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(out: Path, size: Size, methods: tuple[str, ...] = METHODS, reuse: bool = False) -> dict:
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if reuse and (out / "models" / "student" / "config.json").exists():
        train, heldout, teacher, student = out / "data" / "train.jsonl", out / "data" / "heldout.jsonl", out / "models" / "teacher", out / "models" / "student"
    else:
        train, heldout, teacher, student = prepare(out, size)
    evals = out / "eval"
    evals.mkdir(exist_ok=True)
    teachers = {"plain": evaluate(teacher, heldout, evals / "teacher_plain.json"), "privileged": evaluate(teacher, heldout, evals / "teacher_priv.json", privileged=True)}
    baseline = evaluate(student, heldout, evals / "student_start.json")
    print(f"teacher: {teachers['privileged']['accuracy']:.3f} with context, {teachers['plain']['accuracy']:.3f} without; student {baseline['accuracy']:.3f}", flush=True)
    results: dict[str, list[dict]] = {}
    for spec in methods:
        label, method, overrides = parse_method(spec)
        for seed in size.seeds:
            run_dir = out / "runs" / f"{label}-seed{seed}"
            if reuse and (run_dir / "final" / "config.json").exists():
                final = run_dir / "final"  # finished earlier (e.g. before a crash): evaluate only
            else:
                final = distill(method, seed, train, teacher, student, run_dir, size.distill_steps, overrides)
            report = evaluate(final, heldout, evals / f"{label}-seed{seed}.json")
            results.setdefault(label, []).append(report)
            print(f"{label} seed {seed}: accuracy {report['accuracy']:.3f} {report['per_type']}", flush=True)
    table, numbers = summarise(results, baseline, teachers)
    curves = plot_curves(out, list(results), size.seeds)
    minutes = (time.perf_counter() - started) / 60
    text = (f"# Toy experiment: privilege illusion\n\n{len(size.seeds)} seed(s), {size.distill_steps} distillation steps per method, "
            f"held-out {size.heldout_problems} problems, greedy, no privileged context; {minutes:.1f} min.\n"
            "Gap recovered = (method - student) / (teacher without context - student), exact-match accuracy.\n\n" + table + "\n")
    (out / "results.md").write_text(text, encoding="utf-8")
    payload = {"size": size.__dict__, "teachers": teachers, "student_start": baseline, "results": results, "table": numbers, "minutes": minutes, "curves": str(curves)}
    (out / "results.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")
    print("\n" + text)
    return payload


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/toy_privilege")
    parser.add_argument("--quick", action="store_true", help="1 seed, fewer steps (<= 10 min)")
    parser.add_argument("--size", choices=sorted(SIZES), help=argparse.SUPPRESS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS + ABLATIONS),
                        help="methods; an ablation is LABEL=METHOD;key=value;... e.g. 'dopd_noHS=dopd;objective.regime_routes={HS: {enabled: false}}'")
    parser.add_argument("--reuse", action="store_true", help="reuse OUT's data, teacher and student, and finished runs (re-evaluated), e.g. after a crash")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    size = SIZES[args.size or ("quick" if args.quick else "full")]
    run(Path(args.out), size, tuple(args.methods), reuse=args.reuse)


if __name__ == "__main__":
    cli()
