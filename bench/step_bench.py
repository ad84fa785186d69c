"""Training-step benchmark: DOPD vs vanilla OPD in this engine vs TRL's DistillationTrainer.

    python bench/step_bench.py [--steps 5] [--hidden 256] [--prompts 4] [--generations 2] [--new-tokens 32]

The same tiny Qwen3 student and teacher with the real vocabulary (151,936 lm-head rows, built
locally from configs), the same prompts (GSM8K-style generated word problems), the same number of
responses per step and the same response length (EOS is suppressed in every method, so every
response has exactly `--new-tokens` tokens). Each method runs in a fresh subprocess; one warm-up
step, then `--steps` timed optimizer steps (rollout + scoring + loss + backward + update), wall
clock on CPU. Methods:

* dopd:        this engine, objective `dopd` (K 128, three views scored, routed loss).
* vanilla_opd: this engine, objective `vanilla_opd` (teacher without context, top-K reverse KL).
* trl:         `trl.DistillationTrainer` (extra `bench`), beta 1.0 (reverse KL, full vocabulary),
               fully on-policy, one completion per prompt, so its batch has prompts x generations
               prompts to give the same number of responses per step.

Prints one JSON line per method and, last,
`{"step_dopd_over_vanilla": ..., "step_dopd_over_trl": ..., "step_vanilla_over_trl": ..., ...}`.
`--before REV` also times this engine's two methods as they were at git revision REV (checked out
into a temporary worktree and run with that revision's own benchmark worker), so the ratios before
and after a change come from one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("dopd", "vanilla_opd", "trl")
BREAKDOWN: dict[str, float] = {}  # median seconds per phase of our steps (rollout, scoring, loss + backward)


def _models(hidden: int) -> tuple[str, str]:
    student = (
        f"tiny:qwen3:hidden_size={hidden},num_layers=2,num_heads=4,num_kv_heads=2,intermediate_size={2 * hidden},seed=0"
    )
    teacher = (
        f"tiny:qwen3:hidden_size={2 * hidden},num_layers=4,num_heads=8,num_kv_heads=2,"
        f"intermediate_size={4 * hidden},seed=1"
    )
    return student, teacher


def _data(folder: Path, n: int) -> Path:
    from data_builders import build_hints, write_arithmetic_problems

    problems = write_arithmetic_problems(folder / "problems.jsonl", n, seed=0)
    build_hints(problems, folder / "data.jsonl")
    return folder / "data.jsonl"


def run_ours(objective: str, args, work: Path) -> list[float]:
    from dopd_vl import Trainer, load_config, sample_step

    student, teacher = _models(args.hidden)
    config = load_config(
        None,
        [
            f"student.name_or_path={student}",
            f"teacher.name_or_path={teacher}",
            f"data.train={_data(work, 64)}",
            f"output_dir={work / 'run'}",
            f"objective.name={objective}",
            f"optim.batch_size={args.prompts}",
            f"rollout.num_generations={args.generations}",
            f"rollout.max_new_tokens={args.new_tokens}",
            "optim.lr=1e-5",
            f"max_steps={args.steps + 1}",
        ],
    )
    trainer = Trainer(config)
    trainer.run.models.eos_token_ids = [trainer.run.tokenizer.eos_token_id]
    trainer.run.models.suppress_ids = trainer.run.models.suppress_ids + sorted(
        {trainer.run.tokenizer.eos_token_id, *trainer.run.models.student.generation_config.eos_token_id}
    )
    times, parts = [], []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        micro_batches = sample_step(trainer.run, trainer.step)
        rollout = time.perf_counter() - start
        metrics = trainer.train_step(micro_batches)
        times.append(time.perf_counter() - start)
        parts.append({"rollout": rollout, "scoring": metrics["time/scoring"], "loss_backward": metrics["time/loss"]})
    BREAKDOWN.update({k: statistics.median(p[k] for p in parts[1:]) for k in parts[0]})
    return times[1:]


def run_trl(args, work: Path) -> list[float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from dopd_vl import load_records, load_tokenizer, resolve_model_path

    student, teacher = (resolve_model_path(m) for m in _models(args.hidden))
    tokenizer = load_tokenizer(student)
    tokenizer.padding_side = "left"
    records = load_records(_data(work, 64))
    batch = args.prompts * args.generations
    dataset = Dataset.from_list([{"prompt": r["prompt"]} for r in records])
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.start)

    eos = tokenizer.eos_token_id
    config = DistillationConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        max_steps=args.steps + 1,
        learning_rate=1e-5,
        beta=1.0,
        max_completion_length=args.new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        report_to=[],
        logging_steps=1000,
        save_strategy="no",
        use_cpu=True,
        generation_kwargs={"suppress_tokens": [eos, *range(len(tokenizer), 151_936)]},
        bf16=False,
        fp16=False,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = DistillationTrainer(
        model=AutoModelForCausalLM.from_pretrained(student),
        teacher_model=AutoModelForCausalLM.from_pretrained(teacher),
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    trainer.train()
    return times[1:]


def worker(method: str, args) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        times = run_trl(args, Path(tmp)) if method == "trl" else run_ours(method, args, Path(tmp))
    return {
        "method": method,
        "step_s_median": statistics.median(times),
        "step_s": times,
        "phases_s_median": dict(BREAKDOWN),
        "responses_per_step": args.prompts * args.generations,
        "new_tokens": args.new_tokens,
        "hidden": args.hidden,
        "vocab_rows": 151_936,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument(
        "--before", metavar="REV", help="also time dopd and vanilla_opd at git revision REV, beside the current code"
    )
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args)), flush=True)
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.setdefault("DOPD_TINY_CACHE", tempfile.mkdtemp(prefix="dopd-bench-tiny-"))
    runs = [(method, method, REPO) for method in METHODS]
    with tempfile.TemporaryDirectory(prefix="dopd-bench-before-") as before_dir:
        if args.before:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "add", "--detach", before_dir, args.before],
                check=True,
                capture_output=True,
            )
            runs += [(f"{method}_before", method, Path(before_dir)) for method in ("dopd", "vanilla_opd")]
        try:
            results = {label: _run_worker(method, args, tree, env) for label, method, tree in runs}
        finally:
            if args.before:
                subprocess.run(
                    ["git", "-C", str(REPO), "worktree", "remove", "--force", before_dir], capture_output=True
                )
    med = {m: r.get("step_s_median") for m, r in results.items()}
    ratio = lambda a, b: round(med[a] / med[b], 3) if med.get(a) and med.get(b) else None  # noqa: E731
    summary = {
        "step_dopd_over_vanilla": ratio("dopd", "vanilla_opd"),
        "step_dopd_over_trl": ratio("dopd", "trl"),
        "step_vanilla_over_trl": ratio("vanilla_opd", "trl"),
    }
    if args.before:
        summary.update(
            {
                "before": args.before,
                "step_vanilla_over_trl_before": ratio("vanilla_opd_before", "trl"),
                "step_dopd_over_trl_before": ratio("dopd_before", "trl"),
            }
        )
    print(json.dumps({**summary, "targets": {"step_vanilla_over_trl": 1.0, "step_dopd_over_trl": 1.2}}))


def _run_worker(method: str, args, tree: Path, env: dict) -> dict:
    """One method in a fresh process, with the package of `tree` (this checkout or an older revision)."""
    argv = [
        sys.executable,
        str(tree / "bench" / "step_bench.py"),
        "--worker",
        method,
        "--steps",
        str(args.steps),
        "--hidden",
        str(args.hidden),
        "--prompts",
        str(args.prompts),
        "--generations",
        str(args.generations),
        "--new-tokens",
        str(args.new_tokens),
    ]
    done = subprocess.run(argv, env={**env, "PYTHONPATH": str(tree)}, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        result = {
            "method": method,
            "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}",
        }
    else:
        result = json.loads(lines[-1][len("RESULT ") :])
    result["code"] = "current" if tree == REPO else f"revision {args.before}"
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
