"""`dopd demo`: the offline end-to-end demo on tiny models (dopd_vl/apps/demo.py)."""

from __future__ import annotations

from dopd_vl.cli.options import add_device_options


def add_parser(commands) -> None:
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
    add_device_options(demo)
    demo.set_defaults(run=run)


def run(args) -> int:
    from dopd_vl.apps.demo import run_demo

    run_demo(
        args.out,
        seed=args.seed,
        student=args.student,
        teacher=args.teacher,
        steps=args.steps,
        num_images=args.images,
        device=args.device,
        dtype=args.dtype,
        say=print,
    )
    return 0
