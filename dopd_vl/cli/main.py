"""The `dopd` command: the dispatcher. Each subcommand is one module of this package, its parser
beside its handler (`add_parser(commands)` registers it, `run(args)` does it). Errors of the
DopdError family print one line and exit with the error's `exit_code` (1; a run stopped by SIGTERM /
SIGINT after its checkpoint: 75, dopd_vl/training/preemption.py)."""

from __future__ import annotations

import argparse
import logging
import sys

from dopd_vl.cli import (
    build,
    check_data,
    demo,
    diagnose,
    evaluate,
    export,
    inspect_record,
    plot,
    train,
    verify_teacher,
)
from dopd_vl.errors import DopdError
from dopd_vl.version import __version__

SUBCOMMANDS = (inspect_record, evaluate, plot, build, train, verify_teacher, diagnose, export, check_data, demo)
"""In the order `dopd --help` lists them."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dopd", description="Dual On-policy Distillation with privileged information")
    parser.add_argument("--version", action="version", version=f"dopd-vl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for subcommand in SUBCOMMANDS:
        subcommand.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # e.g. an override after a flag: say where overrides go
        misplaced = [item for item in extra if "=" in item and not item.startswith("-")]
        hint = (
            f"; key=value overrides go before any --flag: dopd {args.command} CONFIG {' '.join(misplaced)} [--flags]"
            if misplaced
            else ""
        )
        parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
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
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm():  # a log line goes above a live bar, never into it
            return args.run(args) or 0
    except DopdError as err:
        code = err.exit_code  # a preempted run is not an error: it says so and exits 75
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


if __name__ == "__main__":
    sys.exit(main())
