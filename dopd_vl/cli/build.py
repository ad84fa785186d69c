"""`dopd build grounding|hints`: privileged datasets from detection annotations (boxes + labels)
or worked solutions (step-wise hints), written whole or not at all."""

from __future__ import annotations

from data_builders.hints import STYLE_HELP, STYLES
from data_builders.output import skipped_path
from dopd_vl.errors import ConfigError


def add_parser(commands) -> None:
    build = commands.add_parser("build", help="build privileged datasets").add_subparsers(
        dest="builder", metavar="BUILDER", required=True
    )
    grounding = build.add_parser("grounding", help="detection annotations -> boxes + labels (images)")
    grounding.add_argument(
        "--format",
        required=True,
        choices=("coco", "yolo", "voc", "coco_results", "hf"),
        dest="annotation_format",
        help="annotation files (yolo: also predictions with a confidence column), `coco_results`: a detector's "
        "COCO results JSON (with --categories), or `hf`: a datasets source with image + objects columns (--dataset)",
    )
    grounding.add_argument("--images", help="folder of the images (the dataset root; coco / yolo / voc)")
    grounding.add_argument(
        "--annotations", help="COCO JSON file, YOLO labels folder, VOC XML folder or COCO results JSON"
    )
    grounding.add_argument(
        "--categories",
        help="--format coco_results: a COCO annotations file (its images and categories), or a data.yaml / "
        "classes.txt (category_id k is the k-th name; images named by their integer id)",
    )
    grounding.add_argument(
        "--min-score",
        type=float,
        help="drop predicted boxes whose confidence is below this (counted in the summary); boxes without a score "
        "are kept",
    )
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
    grounding.set_defaults(run=run_grounding)

    hints = build.add_parser("hints", help="worked solutions -> step-wise hints (text)")
    hints.add_argument("--input", required=True, help="JSONL with question + answer (GSM8K) / solution / hints")
    hints.add_argument("--out", required=True, help="output: FILE.jsonl, FILE.parquet or a folder (save_to_disk)")
    hints.add_argument(
        "--style",
        choices=STYLES,
        default="steps",
        help="; ".join(f"{name}: {text}" for name, text in STYLE_HELP.items()),
    )
    hints.add_argument(
        "--allow-leaking-style",
        action="store_true",
        help="build a style that leaks the final answer by design (final_answer); refused without it",
    )
    hints.add_argument("--generator", help="module:attr of a HintGenerator that writes the hints")
    _add_build_options(hints)
    hints.set_defaults(run=run_hints)


def run_grounding(args) -> int:
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
            min_score=args.min_score,
            categories=args.categories,
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


def run_hints(args) -> int:
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
        allow_leaking_style=args.allow_leaking_style,
    )
    _print_report(report, args.out)
    return 0


def _print_report(report, out) -> None:
    print(f"wrote {out}: {report.summary()}")
    if report.skipped:
        print(f"{len(report.skipped)} skipped inputs (images or input lines) listed with why in {skipped_path(out)}")
    for leak in report.leaks[:10]:
        print(f"leak: record {leak['id']}: hints {leak['hints']} contain the final answer {leak['answer']!r}")
    if len(report.leaks) > 10:
        print(f"... and {len(report.leaks) - 10} more records whose hints contain the final answer")


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
