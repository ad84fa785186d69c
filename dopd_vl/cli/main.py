"""The `dopd` command: its parser and entry point (what each subcommand does is in commands.py).
Errors of the DopdError family print one line and exit with status 1; a run stopped by SIGTERM /
SIGINT after its checkpoint exits with 75 (dopd_vl/training/preemption.py)."""

from __future__ import annotations

import argparse
import logging
import sys

from dopd_vl.cli import commands as cli_commands
from dopd_vl.errors import DopdError
from dopd_vl.version import __version__


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
    inspect.set_defaults(run=cli_commands.cmd_inspect)

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
    _add_device_options(evaluate)
    evaluate.set_defaults(run=cli_commands.cmd_eval)

    plot = commands.add_parser("plot", help="PNG plots of a run folder's metrics.jsonl")
    plot.add_argument("run_dir", help="run folder (output_dir of `dopd train`)")
    plot.add_argument("--out", help="folder for the PNGs (default RUN_DIR/plots)")
    plot.set_defaults(run=cli_commands.cmd_plot)

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
    grounding.set_defaults(run=cli_commands.cmd_build_grounding)

    hints = build.add_parser("hints", help="worked solutions -> step-wise hints (text)")
    hints.add_argument("--input", required=True, help="JSONL with question + answer (GSM8K) / solution / hints")
    hints.add_argument("--out", required=True, help="output: FILE.jsonl, FILE.parquet or a folder (save_to_disk)")
    hints.add_argument("--style", choices=("steps", "steps_exec", "summary", "final_answer"), default="steps")
    hints.add_argument("--generator", help="module:attr of a HintGenerator that writes the hints")
    _add_build_options(hints)
    hints.set_defaults(run=cli_commands.cmd_build_hints)

    train = commands.add_parser("train", help="train a student with DOPD or a baseline from a YAML recipe")
    train.add_argument("config", help="YAML recipe (configs/*.yaml)")
    train.add_argument("overrides", nargs="*", help="key=value or section.key=value overrides")
    train.add_argument(
        "--resume", action="store_true", help="continue from the newest complete checkpoint in output_dir"
    )
    train.add_argument(
        "--dry-run", action="store_true", help="check the recipe and overrides, print the resolved config, load nothing"
    )
    train.set_defaults(run=cli_commands.cmd_train)

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
    diagnose.set_defaults(run=cli_commands.cmd_diagnose)

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
    export.set_defaults(run=cli_commands.cmd_export)

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
    check.set_defaults(run=cli_commands.cmd_check_data)

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
    demo.set_defaults(run=cli_commands.cmd_demo)

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


if __name__ == "__main__":
    sys.exit(main())
