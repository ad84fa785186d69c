"""What each `dopd` subcommand does, given its parsed arguments (the parser is in main.py); each
returns the command's exit status."""

from __future__ import annotations

import json
import re
from pathlib import Path

from dopd_vl.errors import ConfigError

_IMAGE_RUN = re.compile(r"<\|vision_start\|>((?:<\|image_pad\|>)+)<\|vision_end\|>")


def cmd_inspect(args) -> int:
    from dopd_vl.data.records import load_records
    from dopd_vl.errors import DatasetError
    from dopd_vl.method.views import PRIVILEGED_VIEWS, TEACHER_VIEWS, VIEWS
    from dopd_vl.modality.adapters import make_adapter
    from dopd_vl.models.loading import check_same_tokenizer, load_processing

    records = load_records(args.data, split=args.split, columns=_columns(args.column))
    if not 0 <= args.index < len(records):
        raise DatasetError(
            f"--index {args.index} is out of range (the file has {len(records)} records)", file=args.data
        )
    record = records[args.index]
    root = _data_image_roots(args)
    student = make_adapter(load_processing(args.student), image_root=root)
    teacher = make_adapter(load_processing(args.teacher), image_root=root) if args.teacher else student
    check_same_tokenizer(student.tokenizer, teacher.tokenizer)
    if args.routing:
        return _write_routing(args, records, root)
    print(f"record {record['id']}  ({args.data}, index {args.index})")
    for view in VIEWS:
        if view in PRIVILEGED_VIEWS and not record.get("privileged_context"):
            print(f"\n=== {view}: skipped (the record has no privileged_context)")
            continue
        prompt = (teacher if view in TEACHER_VIEWS else student).prompt(record, view)
        image_tokens = (
            int((prompt.extras["mm_token_type_ids"] == 1).sum()) if "mm_token_type_ids" in prompt.extras else 0
        )
        print(f"\n=== {view}: {prompt.input_ids.numel()} prompt tokens ({image_tokens} image tokens)")
        print(_IMAGE_RUN.sub(lambda m: "<|vision_start|>[image]<|vision_end|>", prompt.text))
    if record.get("answer") is not None:
        print(f"\n(answer, never shown to any view: {record['answer']})")
    return 0


def _load_for_generation(name_or_path: str, root, device: str = "auto", dtype: str = "auto"):
    """Model (placed on `device` in `dtype`), processing, plain-view adapter, EOS ids and never-sampled ids."""
    from dopd_vl.modality.adapters import make_adapter
    from dopd_vl.models.loading import eos_token_ids, load_model, load_processing, never_sampled_token_ids

    model = load_model(name_or_path, dtype, device=device).eval()
    processing = load_processing(name_or_path)
    return (
        model,
        processing,
        make_adapter(processing, image_root=root),
        eos_token_ids(processing, model),
        never_sampled_token_ids(processing, model),
    )


def _write_routing(args, records: list[dict], root) -> int:
    import torch

    from dopd_vl.cli.routing_page import route_records, write_routing_html
    from dopd_vl.models.loading import check_same_tokenizer
    from dopd_vl.training.rollout import RolloutConfig, sample_responses

    chosen = records[args.index : args.index + args.count]
    student, s_proc, s_adapter, eos, never = _load_for_generation(args.student, root, args.device, args.dtype)
    teacher, t_proc, t_adapter, _, _ = _load_for_generation(args.teacher or args.student, root, args.device, args.dtype)
    vocab = check_same_tokenizer(s_proc, t_proc, student, teacher)
    torch.manual_seed(args.seed)
    rollout = sample_responses(
        student, s_adapter, chosen, RolloutConfig(num_generations=1, max_new_tokens=args.max_new_tokens), eos, never
    )
    routed, thresholds = route_records(
        student, teacher, {"student": s_adapter, "teacher": t_adapter}, chosen, rollout.responses, vocab
    )
    path = write_routing_html(args.routing, routed, thresholds, image_root=root)
    print(f"wrote the routing view of {len(routed)} records to {path}")
    return 0


def cmd_eval(args) -> int:
    from dopd_vl.data.records import load_records
    from dopd_vl.eval.evaluate import EvalConfig, accuracy_report, generate_answers

    if args.harness:
        return _eval_harness(args)
    if not args.data:
        raise ConfigError("dopd eval needs --data (or --harness with --tasks)")

    records = load_records(args.data, split=args.split, columns=_columns(args.column))[: args.limit]
    model, processing, adapter, eos, never = _load_for_generation(
        args.model, _data_image_roots(args), args.device, args.dtype
    )
    config = EvalConfig(args.max_new_tokens, args.batch_size, args.privileged)
    engine = _eval_engine(args, model, processing, adapter, records, config, eos, never)
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
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")
        print(f"accuracy {report['accuracy']} over {report['count']} records; report in {args.out}")
    else:
        print(text)
    return 0


def _eval_engine(args, model, processing, adapter, records, config, eos, never):
    """`--engine vllm`: a vLLM engine on the model's folder (its own weights, nothing to sync)."""
    if args.engine == "hf":
        return None
    import torch

    from dopd_vl.models.loading import vocab_size
    from dopd_vl.models.tiny import resolve_model_path
    from dopd_vl.training.engines import VllmEngine
    from dopd_vl.training.rollout import RolloutConfig

    view = "student_priv" if config.privileged else "student"
    longest = max(adapter.prompt(r, view).input_ids.numel() for r in records)
    placed = next(model.parameters())
    return VllmEngine(
        resolve_model_path(args.model),
        RolloutConfig(engine="vllm", num_generations=1, temperature=0.0, max_new_tokens=config.max_new_tokens),
        dtype=str(placed.dtype).removeprefix("torch."),
        device=torch.device(placed.device),
        max_model_len=longest + config.max_new_tokens,
        vocab_size=vocab_size(processing),
        eos_token_ids=eos,
        suppress_token_ids=never,
        vision=hasattr(processing, "image_processor"),
    )


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


def cmd_plot(args) -> int:
    from dopd_vl.cli.plots import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


def _data_image_roots(args):
    """Where the --data records' image paths may lead (docs/design.md §3.1)."""
    from dopd_vl.data.image_roots import image_roots
    from dopd_vl.data.records import records_root

    return image_roots(records_root(args.data), args.image_root)


def _columns(items: list[str]) -> dict[str, str]:
    columns = {}
    for item in items:
        field, sep, column = item.partition("=")
        if not sep or not field or not column:
            raise ConfigError(f"--column {item!r} is not FIELD=COLUMN")
        columns[field] = column
    return columns


def _print_report(report, out) -> None:
    print(f"wrote {out}: {report.summary()}")
    if report.skipped:
        print(f"skipped records listed in {out}.skipped.jsonl")
    for leak in report.leaks[:10]:
        print(f"leak: record {leak['id']}: hints {leak['hints']} contain the final answer {leak['answer']!r}")
    if len(report.leaks) > 10:
        print(f"... and {len(report.leaks) - 10} more records whose hints contain the final answer")


def cmd_build_grounding(args) -> int:
    from data_builders.grounding import build_grounding, load_annotations, load_hf_detections
    from data_builders.output import BuildReport

    report = BuildReport()  # the loader's skips and counts go into the build's report
    if args.annotation_format == "hf":
        if not args.dataset:
            raise ConfigError("--format hf needs --dataset (a dataset id, folder or Parquet / Arrow file)")
        images = load_hf_detections(
            args.dataset,
            split=args.split,
            bbox_format=args.bbox_format,
            normalized=args.normalized,
            on_error=args.on_error,
            degenerate=args.degenerate,
            report=report,
        )
    else:
        if not args.images or not args.annotations:
            raise ConfigError(f"--format {args.annotation_format} needs --images and --annotations")
        images = load_annotations(
            args.annotation_format,
            args.images,
            args.annotations,
            args.classes,
            on_error=args.on_error,
            degenerate=args.degenerate,
            report=report,
        )
    fmt = args.privileged_format or f"{args.coords}_grounding"
    report = build_grounding(
        images,
        args.out,
        questions=args.questions,
        objects=args.objects,
        privileged_format=fmt,
        seed=args.seed,
        on_error=args.on_error,
        images_root=args.images,
        report=report,
        embed_images=args.embed_images,
        images_dir=args.images_dir,
    )
    _print_report(report, args.out)
    return 0


def cmd_build_hints(args) -> int:
    from data_builders.hints import build_hints

    generator = None
    if args.generator:
        import importlib

        module, _, attr = args.generator.partition(":")
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError) as err:
            raise ConfigError(f"--generator {args.generator!r}: {err}") from err
        generator = obj() if isinstance(obj, type) else obj
    report = build_hints(
        args.input,
        args.out,
        style=args.style,
        privileged_format=args.privileged_format or "hints",
        generator=generator,
        on_error=args.on_error,
        embed_images=args.embed_images,
    )
    _print_report(report, args.out)
    return 0


def cmd_train(args) -> int:
    from dopd_vl.training.config import load_config
    from dopd_vl.training.trainer import Trainer

    config = load_config(args.config, args.overrides)
    if args.dry_run:
        import yaml

        from dopd_vl.training.config import config_to_dict

        print(yaml.safe_dump(config_to_dict(config), sort_keys=False))
        return 0
    final = Trainer(config).train(resume=args.resume)
    print(f"trained student saved to {final}")
    return 0


def cmd_diagnose(args) -> int:
    from dopd_vl.eval.diagnose import diagnose
    from dopd_vl.training.config import load_config

    overrides = list(args.overrides) + ([f"device={args.device}"] if args.device else [])
    config = load_config(args.config, overrides)
    out = Path(args.out) if args.out else Path(config.output_dir) / "diagnose"
    result = diagnose(config, steps=args.steps, out=out)
    print("\n".join(result["reading"]))
    print(f"\nwrote {out / 'diagnose.json'}, {out / 'diagnose.png'} and {out / 'diagnose_rollouts.jsonl'}")
    return 0


def cmd_export(args) -> int:
    from dopd_vl.cli.export import export_student

    out = export_student(
        args.run_dir,
        args.out,
        checkpoint=args.checkpoint,
        adapter=args.adapter,
        eval_data=args.eval_data,
        eval_limit=args.eval_limit,
        max_new_tokens=args.max_new_tokens,
    )
    print(f"exported to {out} (model card: {out / 'README.md'})")
    return 0


def cmd_check_data(args) -> int:
    from dopd_vl.data.image_roots import image_roots
    from dopd_vl.data.preflight import check_data
    from dopd_vl.data.records import records_root
    from dopd_vl.method.objectives import build_objective
    from dopd_vl.method.views import PRIVILEGED_VIEWS
    from dopd_vl.modality.adapters import make_adapter
    from dopd_vl.models.loading import load_processing
    from dopd_vl.training.config import load_config

    config = load_config(args.config, args.overrides)
    processing = load_processing(
        config.student.name_or_path, config.student.trust_remote_code
    )  # the processor only: no weights
    privileged = bool(PRIVILEGED_VIEWS & set(build_objective(config.objective).views)) or config.diagnostics
    reports, faults = [], 0
    out = Path(args.out) if args.out else Path(config.output_dir) / "data_check.json"
    for split_name, source in (("train", config.data.train), ("eval", config.data.eval)):
        if not source:
            continue
        adapter = make_adapter(
            processing, config.data.prompt, image_root=image_roots(records_root(source), config.data.image_roots)
        )
        _, report, _ = check_data(
            source,
            adapter,
            split=config.data.split,
            columns=config.data.columns,
            mode=args.mode,
            max_prompt_length=config.rollout.max_prompt_length,
            privileged=privileged and split_name == "train",
            workers=args.workers,
            image_roots_extra=config.data.image_roots,
        )
        print(report.summary(report=out))
        reports.append({"split": split_name, **report.to_dict()})
        faults += len(report.faults)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"reports": reports}, indent=2) + "\n", encoding="utf-8")
    print(f"report in {out}")
    return 1 if faults else 0


def cmd_demo(args) -> int:
    from dopd_vl.cli.demo import run_demo

    run_demo(
        args.out,
        seed=args.seed,
        student=args.student,
        teacher=args.teacher,
        steps=args.steps,
        num_images=args.images,
        device=args.device,
        dtype=args.dtype,
    )
    return 0
