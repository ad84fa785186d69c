"""`dopd train`: train a student with DOPD or a baseline from a YAML recipe (docs/design.md §4)."""

from __future__ import annotations


def add_parser(commands) -> None:
    train = commands.add_parser("train", help="train a student with DOPD or a baseline from a YAML recipe")
    train.add_argument("config", help="YAML recipe (configs/*.yaml)")
    train.add_argument("overrides", nargs="*", help="key=value or section.key=value overrides")
    train.add_argument(
        "--resume", action="store_true", help="continue from the newest complete checkpoint in output_dir"
    )
    train.add_argument(
        "--dry-run", action="store_true", help="check the recipe and overrides, print the resolved config, load nothing"
    )
    train.set_defaults(run=run)


def run(args) -> int:
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
