"""`dopd export`: a Hugging Face model folder with a model card from a run's student (docs/design.md §4.7)."""

from __future__ import annotations


def add_parser(commands) -> None:
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
    export.set_defaults(run=run)


def run(args) -> int:
    from dopd_vl.apps.export import export_student

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
