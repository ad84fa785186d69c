"""`dopd plot`: PNG plots of a run folder's metrics.jsonl."""

from __future__ import annotations


def add_parser(commands) -> None:
    plot = commands.add_parser("plot", help="PNG plots of a run folder's metrics.jsonl")
    plot.add_argument("run_dir", help="run folder (output_dir of `dopd train`)")
    plot.add_argument("--out", help="folder for the PNGs (default RUN_DIR/plots)")
    plot.set_defaults(run=run)


def run(args) -> int:
    from dopd_vl.apps.plots import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0
