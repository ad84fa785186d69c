"""`dopd diagnose`: the preflight of a recipe, what DOPD's routing will do on its data
(dopd_vl/eval/diagnose.py, docs/design.md §1.11)."""

from __future__ import annotations

from pathlib import Path

from dopd_vl.cli.options import data_report_path, replaced


def add_parser(commands) -> None:
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
        "--out",
        help="folder for diagnose.json, diagnose.png and diagnose_rollouts.jsonl (default: diagnose/DATA beside the "
        "recipe's output_dir, DATA the training data's name; never a run's folder)",
    )
    diagnose.add_argument(
        "--device", choices=("auto", "cpu"), help="auto (the GPU when present) or cpu; default: the recipe's"
    )
    diagnose.set_defaults(run=run)


def run(args) -> int:
    from dopd_vl.eval.diagnose import diagnose, terminal_reading
    from dopd_vl.training.config import load_config

    overrides = list(args.overrides) + ([f"device={args.device}"] if args.device else [])
    config = load_config(args.config, overrides)
    out = Path(args.out) if args.out else data_report_path(config.output_dir, "diagnose", config.data.train)
    earlier = replaced(out / "diagnose.json")
    result = diagnose(config, steps=args.steps, out=out)
    print(terminal_reading(result["reading"]))  # wrapped to a terminal; diagnose.json keeps each line whole
    print(f"\nwrote {out / 'diagnose.json'}, {out / 'diagnose.png'} and {out / 'diagnose_rollouts.jsonl'}{earlier}")
    return 0
