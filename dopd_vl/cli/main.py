"""The `dopd` command. Errors of the DopdError family print one line and exit with status 1; a run
stopped by SIGTERM / SIGINT after its checkpoint exits with 75 (dopd_vl/training/preemption.py)."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

from dopd_vl.errors import ConfigError, DopdError
from dopd_vl.version import __version__

_IMAGE_RUN = re.compile(r"<\|vision_start\|>((?:<\|image_pad\|>)+)<\|vision_end\|>")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dopd", description="Dual On-policy Distillation with privileged information")
    parser.add_argument("--version", action="version", version=f"dopd-vl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    inspect = commands.add_parser("inspect", help="print a record's rendered views and token counts")
    inspect.add_argument(
        "--student", required=True, help="student model folder or hub id (its tokenizer / processor is used)"
    )
    inspect.add_argument("--teacher", help="teacher model folder or hub id (default: the student's)")
    inspect.add_argument("--data", required=True, help="dataset: JSONL, Parquet / Arrow file, dataset folder or id")
    _add_data_options(inspect)
    inspect.add_argument("--index", type=int, default=0, help="record number in the file (0-based)")
    inspect.add_argument(
        "--routing",
        metavar="OUT.html",
        help="write the token routing view (needs model weights): the student answers "
        "records --index.. --index+--count-1 and every response token is coloured by its DOPD regime",
    )
    inspect.add_argument("--count", type=int, default=4, help="records in the routing view")
    inspect.add_argument("--max-new-tokens", type=int, default=32, help="response length cap for the routing view")
    inspect.add_argument("--seed", type=int, default=0, help="sampling seed for the routing view")
    _add_device_options(inspect)
    inspect.set_defaults(run=_inspect)

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
    _add_data_options(evaluate)
    evaluate.add_argument("--privileged", action="store_true", help="answer with the privileged context in the prompt")
    evaluate.add_argument(
        "--out",
        help="write the JSON report here instead of stdout (--harness: the results folder, default harness_out)",
    )
    evaluate.add_argument("--max-new-tokens", type=int, default=32)
    evaluate.add_argument(
        "--batch-size", type=int, default=8, help="records per generate call (--harness: the harness's batch size)"
    )
    evaluate.add_argument("--limit", type=int, help="evaluate the first N records only")
    _add_device_options(evaluate)
    evaluate.set_defaults(run=_eval)

    plot = commands.add_parser("plot", help="PNG plots of a run folder's metrics.jsonl")
    plot.add_argument("run_dir", help="run folder (output_dir of `dopd train`)")
    plot.add_argument("--out", help="folder for the PNGs (default RUN_DIR/plots)")
    plot.set_defaults(run=_plot)

    build = commands.add_parser("build", help="build privileged datasets").add_subparsers(
        dest="builder", metavar="BUILDER", required=True
    )
    grounding = build.add_parser("grounding", help="detection annotations -> boxes + labels (images)")
    grounding.add_argument(
        "--format",
        required=True,
        choices=("coco", "yolo", "voc", "hf"),
        dest="annotation_format",
        help="annotation files, or `hf`: a datasets source with image + objects columns (--dataset)",
    )
    grounding.add_argument("--images", help="folder of the images (the dataset root; coco / yolo / voc)")
    grounding.add_argument("--annotations", help="COCO JSON file, YOLO labels folder or VOC XML folder")
    grounding.add_argument(
        "--dataset", help="--format hf: a dataset id, folder (save_to_disk or load_dataset) or Parquet / Arrow file"
    )
    grounding.add_argument("--split", default="train", help="--format hf: the split (default train)")
    grounding.add_argument(
        "--bbox-format",
        choices=("coco", "pascal_voc", "yolo"),
        default="coco",
        help="--format hf: layout of objects.bbox",
    )
    grounding.add_argument(
        "--normalized", action="store_true", help="--format hf: coco / pascal_voc boxes are in 0-1 (yolo always is)"
    )
    grounding.add_argument(
        "--classes", help="YOLO class names: data.yaml or classes.txt (default: searched near the labels)"
    )
    grounding.add_argument("--out", required=True, help="output: FILE.jsonl, FILE.parquet or a folder (save_to_disk)")
    grounding.add_argument(
        "--questions", help="QA JSONL: image, question, optional answer / id / labels (default: synthesised)"
    )
    grounding.add_argument(
        "--objects", choices=("query", "all"), default="query", help="attach query-related objects (default) or all"
    )
    grounding.add_argument("--coords", choices=("qwen3vl", "qwen25vl"), default="qwen3vl", help="built-in box format")
    grounding.add_argument(
        "--degenerate",
        choices=("drop", "keep", "fail"),
        default="drop",
        help="boxes of zero width or height: drop them (counted in the summary), keep them, or fail",
    )
    grounding.add_argument(
        "--images-dir",
        help="a .jsonl --out from a dataset whose images are only bytes: the folder beside it, "
        "relative to its folder, that the images are written to (default OUT_STEM_images)",
    )
    _add_build_options(grounding)
    grounding.set_defaults(run=_build_grounding)

    hints = build.add_parser("hints", help="worked solutions -> step-wise hints (text)")
    hints.add_argument("--input", required=True, help="JSONL with question + answer (GSM8K) / solution / hints")
    hints.add_argument("--out", required=True, help="output: FILE.jsonl, FILE.parquet or a folder (save_to_disk)")
    hints.add_argument("--style", choices=("steps", "steps_exec", "summary", "final_answer"), default="steps")
    hints.add_argument("--generator", help="module:attr of a HintGenerator that writes the hints")
    _add_build_options(hints)
    hints.set_defaults(run=_build_hints)

    train = commands.add_parser("train", help="train a student with DOPD or a baseline from a YAML recipe")
    train.add_argument("config", help="YAML recipe (configs/*.yaml)")
    train.add_argument("overrides", nargs="*", help="key=value or section.key=value overrides")
    train.add_argument(
        "--resume", action="store_true", help="continue from the newest complete checkpoint in output_dir"
    )
    train.add_argument(
        "--dry-run", action="store_true", help="check the recipe and overrides, print the resolved config, load nothing"
    )
    train.set_defaults(run=_train)

    diagnose = commands.add_parser(
        "diagnose", help="preflight: what DOPD's routing will do on your data (rollouts and scoring, no update)"
    )
    diagnose.add_argument("config", help="YAML recipe (configs/*.yaml)")
    diagnose.add_argument("overrides", nargs="*", help="key=value or section.key=value overrides")
    diagnose.add_argument(
        "--steps",
        type=int,
        default=4,
        help="steps of rollouts to score (default 4; the run's first steps, never trained on)",
    )
    diagnose.add_argument(
        "--out", help="folder for diagnose.json, diagnose.png and diagnose_rollouts.jsonl (default OUTPUT_DIR/diagnose)"
    )
    diagnose.add_argument(
        "--device", choices=("auto", "cpu"), help="auto (the GPU when present) or cpu; default: the recipe's"
    )
    diagnose.set_defaults(run=_diagnose)

    export = commands.add_parser("export", help="a Hugging Face model folder with a model card from a run's student")
    export.add_argument("run_dir", help="run folder (output_dir of `dopd train`)")
    export.add_argument("--out", required=True, help="new folder for the model (must not exist or be empty)")
    export.add_argument("--checkpoint", type=int, help="export checkpoint-N instead of the final student")
    export.add_argument(
        "--adapter",
        action="store_true",
        help="keep the LoRA adapter (peft folder) instead of merging it (newest checkpoint by default)",
    )
    export.add_argument(
        "--eval-data",
        help="records with `answer`: greedy accuracy of the base student and of the export goes into the card",
    )
    export.add_argument("--eval-limit", type=int, help="evaluate the first N records only")
    export.add_argument("--max-new-tokens", type=int, default=32, help="answer length cap for --eval-data")
    export.set_defaults(run=_export)

    check = commands.add_parser(
        "check-data",
        help="check every record of a recipe's data before training (images, boxes, contexts, prompt lengths)",
    )
    check.add_argument("config", help="YAML recipe (configs/*.yaml)")
    check.add_argument("overrides", nargs="*", help="key=value or section.key=value overrides")
    check.add_argument(
        "--mode",
        choices=("quick", "full"),
        default="full",
        help="full (default): decode every image; quick: open it and check its end marker",
    )
    check.add_argument("--out", help="JSON report (default OUTPUT_DIR/data_check.json)")
    check.add_argument("--workers", type=int, default=8, help="threads checking images")
    check.set_defaults(run=_check_data)

    demo = commands.add_parser("demo", help="the offline end-to-end demo on tiny models")
    demo.add_argument("--out", default="demo_out", help="output folder")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--student", help="student model folder or hub id (default: a tiny Qwen3-VL built offline)")
    demo.add_argument(
        "--teacher",
        help="teacher model folder or hub id (default: a tiny Qwen3-VL built offline, then taught to use the boxes)",
    )
    demo.add_argument("--steps", type=int, help="DOPD training steps (default 24)")
    demo.add_argument("--images", type=int, help="generated scenes (default 32)")
    _add_device_options(demo)
    demo.set_defaults(run=_demo)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    for ours in ("dopd_vl", "data_builders"):  # our progress messages; other libraries stay at WARNING
        logging.getLogger(ours).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not args.verbose:
        _quiet_library_progress()
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except DopdError as err:
        code = getattr(err, "exit_code", 1)  # a preempted run is not an error: it says so and exits 75
        print(f"dopd {args.command}: {'error: ' if code == 1 else ''}{err}", file=sys.stderr)
        return code


def _quiet_library_progress() -> None:
    """Our own progress bars stay; transformers' per-load and per-save bars ("Loading weights",
    "Writing model shards", one for every tiny model) and the hub's are switched off (`--verbose`
    keeps them)."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def _inspect(args) -> int:
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


def _eval(args) -> int:
    from dopd_vl.data.records import load_records
    from dopd_vl.eval.evaluate import EvalConfig, accuracy_report, generate_answers

    if args.harness:
        return _eval_harness(args)
    if not args.data:
        raise ConfigError("dopd eval needs --data (or --harness with --tasks)")

    records = load_records(args.data, split=args.split, columns=_columns(args.column))[: args.limit]
    model, _, adapter, eos, never = _load_for_generation(args.model, _data_image_roots(args), args.device, args.dtype)
    answers = generate_answers(
        model, adapter, records, EvalConfig(args.max_new_tokens, args.batch_size, args.privileged), eos, never
    )
    placed = next(model.parameters())
    report = {
        "model": str(args.model),
        "data": str(args.data),
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


def _plot(args) -> int:
    from dopd_vl.cli.plots import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


def _add_device_options(parser) -> None:
    parser.add_argument("--device", default="auto", help="auto (the GPU when present), cpu, cuda or cuda:N")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="auto (bfloat16 on GPUs that support it, else float32), float32, bfloat16, float16",
    )


def _add_data_options(parser) -> None:
    parser.add_argument("--split", default="train", help="split of a datasets source (default train)")
    parser.add_argument(
        "--column",
        action="append",
        default=[],
        metavar="FIELD=COLUMN",
        help="read a record field from another column, e.g. --column prompt=question (repeatable)",
    )
    parser.add_argument(
        "--image-root",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder image paths may also lead into, besides the dataset's folder and the trusted roots (repeatable)",
    )


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


def _add_build_options(parser) -> None:
    parser.add_argument(
        "--privileged-format",
        help="registered format name or module:attr (overrides the default); built in: "
        "qwen3vl_grounding, qwen25vl_grounding, crop (an evidence crop of the image: Vision-OPD), hints",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of synthesised questions")
    parser.add_argument(
        "--on-error",
        choices=("fail", "skip"),
        default="fail",
        help="stop at the first bad record, or skip it into OUT.skipped.jsonl",
    )
    parser.add_argument(
        "--embed-images",
        action="store_true",
        help="store the image bytes in the output (a .parquet file or a folder): one portable artifact",
    )


def _print_report(report, out) -> None:
    print(f"wrote {out}: {report.summary()}")
    if report.skipped:
        print(f"skipped records listed in {out}.skipped.jsonl")
    for leak in report.leaks[:10]:
        print(f"leak: record {leak['id']}: hints {leak['hints']} contain the final answer {leak['answer']!r}")
    if len(report.leaks) > 10:
        print(f"... and {len(report.leaks) - 10} more records whose hints contain the final answer")


def _build_grounding(args) -> int:
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


def _build_hints(args) -> int:
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


def _train(args) -> int:
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


def _diagnose(args) -> int:
    from dopd_vl.cli.diagnose import diagnose
    from dopd_vl.training.config import load_config

    overrides = list(args.overrides) + ([f"device={args.device}"] if args.device else [])
    config = load_config(args.config, overrides)
    out = Path(args.out) if args.out else Path(config.output_dir) / "diagnose"
    result = diagnose(config, steps=args.steps, out=out)
    print("\n".join(result["reading"]))
    print(f"\nwrote {out / 'diagnose.json'}, {out / 'diagnose.png'} and {out / 'diagnose_rollouts.jsonl'}")
    return 0


def _export(args) -> int:
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


def _check_data(args) -> int:
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


def _demo(args) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
