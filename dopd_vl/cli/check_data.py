"""`dopd check-data`: every record of a recipe's data checked before training (docs/design.md §3.1)."""

from __future__ import annotations

import json
from pathlib import Path

from dopd_vl.cli.options import data_report_path, replaced


def add_parser(commands) -> None:
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
    check.add_argument(
        "--out", help="JSON report (default: check-data/DATA.json beside the recipe's output_dir; never a run's folder)"
    )
    check.add_argument("--workers", type=int, default=8, help="threads checking images")
    check.set_defaults(run=run)


def run(args) -> int:
    from dopd_vl.data.image_roots import image_roots
    from dopd_vl.data.preflight import check_data
    from dopd_vl.data.sources import records_root
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
    default = data_report_path(config.output_dir, "check-data", config.data.train, ".json")
    out = Path(args.out) if args.out else default
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
    earlier = replaced(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"reports": reports}, indent=2) + "\n", encoding="utf-8")
    print(f"report in {out}{earlier}")
    return 1 if faults else 0
