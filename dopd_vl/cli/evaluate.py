"""`dopd eval`: greedy answers and accuracy per question type, or a benchmark harness
(lm-eval, lmms-eval)."""

from __future__ import annotations

import json
from pathlib import Path

from dopd_vl.cli.options import (
    add_data_options,
    add_device_options,
    columns,
    data_image_roots,
    load_for_generation,
    replaced,
    vllm_engine,
)
from dopd_vl.errors import ConfigError


def add_parser(commands) -> None:
    evaluate = commands.add_parser(
        "eval", help="greedy answers and accuracy per question type, or a harness (lm-eval, lmms-eval)"
    )
    evaluate.add_argument(
        "--model", required=True, help="model folder, hub id, or (with --harness) a run folder: its final student"
    )
    evaluate.add_argument(
        "--data",
        help="dataset with `answer`: JSONL, Parquet / Arrow file, dataset folder or id "
        "(with --harness lm-eval: run as a local harness task, no download)",
    )
    evaluate.add_argument(
        "--harness",
        choices=("lm-eval", "lmms-eval"),
        help="evaluate through lm-evaluation-harness (text students) "
        "or lmms-eval (vision students) instead (extra: pip install 'dopd-vl[eval]')",
    )
    evaluate.add_argument(
        "--tasks", help="--harness: comma-separated benchmark tasks, e.g. gsm8k or mmmu_val (their data is downloaded)"
    )
    evaluate.add_argument(
        "--apply-chat-template", action="store_true", help="--harness lm-eval --tasks: prompt through the chat template"
    )
    add_data_options(evaluate)
    evaluate.add_argument("--privileged", action="store_true", help="answer with the privileged context in the prompt")
    evaluate.add_argument(
        "--out",
        help="the JSON report (every answer); default: eval/MODEL-DATA.json beside the model folder (a hub id: in "
        "the current folder); --harness: the results folder, default harness_out",
    )
    evaluate.add_argument("--max-new-tokens", type=int, default=32)
    evaluate.add_argument(
        "--engine",
        choices=("hf", "vllm"),
        default="hf",
        help="what generates the greedy answers: Hugging Face generate, or vLLM (installed separately: README, "
        "'Fast rollouts with vLLM'); the same answers",
    )
    evaluate.add_argument(
        "--batch-size", type=int, default=8, help="records per generate call (--harness: the harness's batch size)"
    )
    evaluate.add_argument("--limit", type=int, help="evaluate the first N records only")
    add_device_options(evaluate)
    evaluate.set_defaults(run=run)


def run(args) -> int:
    from dopd_vl.data.sources import load_records
    from dopd_vl.eval.evaluate import EvalConfig, accuracy_report, generate_answers

    if args.harness:
        return _eval_harness(args)
    if not args.data:
        raise ConfigError("dopd eval needs --data (or --harness with --tasks)")

    records = load_records(args.data, split=args.split, columns=columns(args.column))[: args.limit]
    model, processing, adapter, eos, never = load_for_generation(
        args.model, data_image_roots(args), args.device, args.dtype
    )
    config = EvalConfig(args.max_new_tokens, args.batch_size, args.privileged)
    view = "student_priv" if config.privileged else "student"
    engine = (
        vllm_engine(args.model, model, processing, adapter, records, view, config.max_new_tokens, eos, never)
        if (args.engine == "vllm")
        else None
    )
    answers = generate_answers(model, adapter, records, config, eos, never, engine=engine)
    placed = next(model.parameters())
    report = {
        "model": str(args.model),
        "data": str(args.data),
        "engine": args.engine,
        "privileged": args.privileged,
        "device": str(placed.device),
        "dtype": str(placed.dtype).removeprefix("torch."),
        **accuracy_report(records, answers),
    }
    out = Path(args.out) if args.out else default_report(args.model, args.data, args.privileged)
    earlier = replaced(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    per_type = ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in sorted(report["per_type"].items()))
    print(f"accuracy {report['accuracy']:.3f} over {report['count']} records ({per_type}); report in {out}{earlier}")
    return 0


def default_report(model: str, data: str, privileged: bool) -> Path:
    """eval/MODEL-DATA[-privileged].json beside a model folder (the terminal gets a summary line, the
    file every answer); for a hub id, in the current folder."""
    from dopd_vl.data.sources import data_label

    folder = Path(model)
    base = folder.parent if folder.is_dir() else Path(".")
    name = f"{data_label(model)}-{data_label(data)}{'-privileged' if privileged else ''}.json"
    return base / "eval" / name


def _eval_harness(args) -> int:
    from dopd_vl.eval.harness import run_lm_eval, run_lmms_eval, summary_table
    from dopd_vl.models.loading import resolve_device, resolve_dtype

    tasks = [t for t in (args.tasks or "").split(",") if t]
    out = Path(args.out) if args.out else Path("harness_out")
    device = resolve_device(args.device)
    if args.harness == "lm-eval":
        metrics = run_lm_eval(
            args.model,
            out,
            tasks=tasks or None,
            data=args.data,
            limit=args.limit,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            device=str(device),
            dtype=resolve_dtype(args.dtype, device),
            apply_chat_template=args.apply_chat_template,
            split=args.split,
        )
    else:
        metrics = run_lmms_eval(
            args.model,
            out,
            tasks=tasks or None,
            data=args.data,
            limit=args.limit,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            device=str(device),
            split=args.split,
            image_roots=args.image_root,
        )
    table = summary_table(metrics, args.harness, args.model)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(table, encoding="utf-8")
    print(table + f"\nharness results in {out}")
    return 0
