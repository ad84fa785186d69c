"""`dopd verify-teacher`: the privileged teacher's greedy answer to every training record, checked by
the recipe's verifier (docs/design.md §1.12): its accuracy overall and per question type, and a
teacher_verdicts.jsonl that `data.teacher_verdicts` reads."""

from __future__ import annotations

import json
from pathlib import Path

from dopd_vl.cli.options import add_device_options, data_report_path, replaced, vllm_engine


def add_parser(commands) -> None:
    verify = commands.add_parser(
        "verify-teacher",
        help="check the privileged teacher's greedy answer to every training record (its accuracy; the verdicts "
        "objective.trust: verified and data.teacher_filter read)",
    )
    verify.add_argument("config", help="YAML recipe (configs/*.yaml)")
    verify.add_argument("overrides", nargs="*", help="key=value or section.key=value overrides")
    verify.add_argument(
        "--out",
        help="the verdicts, one JSON line per record (default: verify-teacher/DATA.jsonl beside the recipe's "
        "output_dir; train with data.teacher_verdicts=PATH)",
    )
    verify.add_argument(
        "--engine",
        choices=("hf", "vllm"),
        help="what generates the answers: Hugging Face generate or vLLM (default: the recipe's rollout.engine)",
    )
    verify.add_argument("--batch-size", type=int, default=8, help="records per generate call (hf)")
    add_device_options(verify)
    verify.set_defaults(run=run)


def run(args) -> int:
    from dopd_vl.data.image_roots import image_roots
    from dopd_vl.data.sources import records_root
    from dopd_vl.data.training_set import preflight_records
    from dopd_vl.data.verify import get_verifier
    from dopd_vl.errors import ConfigError
    from dopd_vl.modality.adapters import make_adapter
    from dopd_vl.models.loading import (
        eos_token_ids,
        load_model,
        load_processing,
        never_sampled_token_ids,
        resolve_device,
        resolve_dtype,
    )
    from dopd_vl.training.config import load_config
    from dopd_vl.training.teacher_verdicts import (
        report_line,
        teacher_answers,
        teacher_verdict_rows,
        verdict_report,
        write_teacher_verdicts,
    )

    c = load_config(args.config, args.overrides)
    verifier = get_verifier(c.data.verifier)
    if not c.teacher.name_or_path:
        raise ConfigError("dopd verify-teacher needs teacher.name_or_path in the recipe")
    device = resolve_device(args.device)
    teacher = load_model(
        c.teacher.name_or_path, resolve_dtype(args.dtype, device), c.teacher.trust_remote_code, device=device
    ).eval()
    processing = load_processing(c.teacher.name_or_path, c.teacher.trust_remote_code)
    root = image_roots(records_root(c.data.train), c.data.image_roots)
    adapter = make_adapter(processing, c.data.prompt, image_root=root)
    records, skipped = preflight_records(c.data, adapter, max_prompt_length=c.rollout.max_prompt_length)
    eos, never = eos_token_ids(processing, teacher), never_sampled_token_ids(processing, teacher)
    engine = None
    if (args.engine or c.rollout.engine) == "vllm":
        new_tokens = c.rollout.max_new_tokens
        engine = vllm_engine(
            c.teacher.name_or_path, teacher, processing, adapter, records, "teacher_priv", new_tokens, eos, never
        )
    answers = teacher_answers(
        teacher, adapter, records, eos, never, c.rollout.max_new_tokens, args.batch_size, engine=engine
    )
    rows = teacher_verdict_rows(records, answers, verifier)
    out = Path(args.out) if args.out else data_report_path(c.output_dir, "verify-teacher", c.data.train, ".jsonl")
    earlier = replaced(out)
    write_teacher_verdicts(out, rows)
    report = verdict_report(rows)
    out.with_suffix(".report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    left_out = f"; {len(skipped)} faulty record(s) left out (data.on_error=skip)" if skipped else ""
    print(f"{report_line(report)}{left_out}")
    print(f"verdicts in {out}{earlier}; train on them with data.teacher_verdicts={out}")
    return 0
