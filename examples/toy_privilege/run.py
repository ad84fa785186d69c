"""Toy experiments: the privilege illusion, DOPD and the baselines, on CPU.

    python -m examples.toy_privilege.run --task add_hidden              # 3 seeds, main table (<= 60 min, 2 cores)
    python -m examples.toy_privilege.run --task two_step --study all    # + pruning and learning-rate studies
    python -m examples.toy_privilege.run --quick                        # 1 seed, fewer steps (<= 10 min)
    python -m examples.toy_privilege.run --task two_step --study strength   # the student-strength study (strength.py)

Tasks (task.py): `add_hidden`, single-digit addition whose second operand may be hidden (the
context reveals it: information no student can infer); `two_step`, `a*b+c=` answered with a
worked solution, the context being the first step's result (inferable: the paper's regime).

A seed covers the whole pipeline: the data, the teacher (a Qwen3-architecture model trained with
and without the context), the student's warm-up (a smaller model trained briefly, so capable but
weak) and the distillation. From that seed's student, every method trains for the same steps
through the package's Trainer and config.yaml; everything is evaluated without privileged context
on held-out problems through `dopd eval`.

Studies (`--study`; `calibrate` and `strength`, the student-strength study, are described in
strength.py): `main` (the methods and ablations, every seed), `prune` (pruned_opd dropping
20% of tokens by largest A / random / smallest A, every seed), `lr` (dopd live, dopd with the
initial privileged student and vanilla OPD at learning rates 1e-4 and 1e-3, seed 0; 3e-4 is the
main runs'), `comparison` (EOPD and ExOPD, with the privileged and the plain teacher, beside
vanilla / privileged OPD and DOPD with the initial privileged student, every seed), `all` (main,
prune and lr).

Writes OUT (default runs/toy_privilege/TASK): results.md (tables), results.json, curves.png, each
seed's data / models / eval reports, and runs/LABEL-seedS/ (metrics.jsonl, final/).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from examples.toy_privilege import harness as toy
from examples.toy_privilege import strength, trust, verified


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments (the docs' commands are checked against it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(toy.TASKS), default="add_hidden")
    parser.add_argument("--out", help="default runs/toy_privilege/TASK")
    parser.add_argument("--quick", action="store_true", help="1 seed, fewer steps and methods (<= 10 min)")
    parser.add_argument("--size", choices=["full", "quick", "smoke"], help=argparse.SUPPRESS)
    parser.add_argument(
        "--study",
        choices=["main", "prune", "lr", "comparison", "all", "calibrate", "strength", "trust", "verified"],
        default="main",
        help="all = main + prune + lr; comparison = the paper's comparison methods EOPD and ExOPD beside vanilla, "
        "privileged and DOPD (initial); "
        "calibrate / strength = the student-strength study (strength.py): the warm-up curve, then 3 strengths x 3 "
        "seeds x 5 methods; trust = the trust study (trust.py, two_step): a blind-spot and a clean teacher, 6 methods "
        "each at its dev-chosen lr, 3 seeds, and a first-step readout; verified = the verified-routing cells "
        "(verified.py): on two_step the trust study's cells, on either task the strength study's high student",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        help="instead of --study: methods; an ablation is LABEL=METHOD;key=value;... "
        "e.g. 'dopd_noHS=dopd;objective.regime_routes={HS: {enabled: false}}'",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (the GPU when present), cpu or cuda[:N]; models stay float32 (tiny)"
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="reuse OUT's prepared seeds and finished runs, e.g. after a crash or for another study",
    )
    return parser


def cli() -> None:
    parser = build_parser()
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    task = toy.TASKS[args.task]
    size_name = args.size or ("quick" if args.quick else "full")
    if args.study == "verified":
        verified.run(Path(args.out or f"runs/toy_privilege/verified/{args.task}"), args.task, size_name, args.device)
        return
    if args.study == "trust":
        if args.task != "two_step":
            parser.error("--study trust needs --task two_step (the blind-spot teacher drops two_step's carry)")
        size = task.sizes[size_name]
        if size_name != "smoke":  # the strength study's high student
            size = dataclasses.replace(size, student_sft_steps=strength.WARMUP_STEPS[args.task][-1])
        trust.run_study(Path(args.out or f"runs/toy_privilege/trust/{args.task}"), args.task, size, args.device)
        return
    if args.study in ("calibrate", "strength"):
        out = Path(args.out or f"runs/toy_privilege/strength/{args.task}")
        if args.study == "calibrate":
            strength.calibrate(out, args.task, task.sizes[size_name], args.device)
        else:
            strength.run_study(out, args.task, task.sizes[size_name], args.device, args.reuse)
        return
    specs = (
        [(m, None) for m in args.methods]
        if args.methods
        else toy.study_methods(args.study, task, quick=size_name != "full")
    )
    toy.run_methods(
        Path(args.out or f"runs/toy_privilege/{args.task}"),
        args.task,
        task.sizes[size_name],
        specs,
        reuse=args.reuse,
        device=args.device,
    )


if __name__ == "__main__":
    cli()
