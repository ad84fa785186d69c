"""`dopd train`: train a student with DOPD or a baseline from a YAML recipe (docs/design.md §4)."""

from __future__ import annotations

import json
from pathlib import Path


def add_parser(commands) -> None:
    train = commands.add_parser("train", help="train a student with DOPD or a baseline from a YAML recipe")
    train.add_argument("config", help="YAML recipe (configs/*.yaml)")
    train.add_argument("overrides", nargs="*", help="key=value or section.key=value overrides")
    train.add_argument(
        "--resume", action="store_true", help="continue from the newest complete checkpoint in output_dir"
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an output_dir that holds a run: its checkpoints, final student and metrics go first",
    )
    train.add_argument(
        "--dry-run", action="store_true", help="check the recipe and overrides, print the resolved config, load nothing"
    )
    train.set_defaults(run=run)


def run(args) -> int:
    from dopd_vl.training.checkpointing import check_new_run
    from dopd_vl.training.config import load_config
    from dopd_vl.training.trainer import Trainer

    config = load_config(args.config, args.overrides)
    check_new_run(config.output_dir, args.resume, args.overwrite)  # before anything is loaded
    if args.dry_run:
        import yaml

        from dopd_vl.training.config import config_to_dict

        print(yaml.safe_dump(config_to_dict(config), sort_keys=False))
        return 0
    final = Trainer(config).train(resume=args.resume, overwrite=args.overwrite)
    print(f"trained student saved to {final}")
    print(_last_step(Path(config.output_dir) / "metrics.jsonl"))
    print(f"next: dopd plot {config.output_dir}   |   dopd export {config.output_dir} --out EXPORT_DIR")
    return 0


def _last_step(metrics: Path) -> str:
    """One line of the run's last logged step: loss, regime shares, accuracy where logged."""
    lines = metrics.read_text(encoding="utf-8").splitlines() if metrics.is_file() else []
    if not lines:
        return f"no metrics logged in {metrics}"
    last = json.loads(lines[-1])
    keys = ("loss", "frac/LH", "frac/LL", "frac/HT", "frac/HS", "accuracy", "response_length")
    shown = "  ".join(f"{k} {last[k]:.3g}" for k in keys if isinstance(last.get(k), (int, float)))
    return f"last step {last.get('step')}: {shown}"
