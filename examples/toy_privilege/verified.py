"""The verified-routing study (run through `run.py --study verified`; docs/design.md §1.12):

    python -m examples.toy_privilege.run --task two_step --study verified     # trust cells + strength cells
    python -m examples.toy_privilege.run --task add_hidden --study verified   # strength cells

The question: is there a configuration that is never below the better of vanilla OPD and the
practitioner's filtered baseline (vanilla OPD on the records whose teacher verdict is right) by
more than noise, and keeps the trust study's blind-spot win? Methods (trust.VERIFIED_METHODS):
vanilla OPD, vanilla OPD + `data.teacher_filter: verified`, DOPD `initial` with the paper's rule and
with `objective.trust: verified`, DOPD live with `trust: verified`, and `uni_opd`.

* **Trust cells** (`two_step` only): the trust study's design (trust.py) with these methods: a
  clean and a blind-spot teacher, the strength study's high student, each method's learning rate
  chosen on seed 0's dev split, 3 seeds; no token readout (the trust study has it), the verdicts'
  first-step token shares from the training logs instead. OUT/trust/.
* **Strength cells**: the strength study's design (strength.py) at its high student, where every
  DOPD configuration trailed vanilla OPD with a clean teacher: lr 3e-4, 3 seeds. OUT/strength/.

OUT defaults to runs/toy_privilege/verified/TASK; `tables(OUT)` writes OUT/results.md and the
measured cells (verified_study.json beside OUT, copied into dopd_vl/assets/).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from examples.toy_privilege import harness as toy
from examples.toy_privilege import strength, trust

METHODS = trust.VERIFIED_METHODS


def run(
    out: Path,
    task_name: str,
    size_name: str = "full",
    device: str = "auto",
    methods: tuple[str, ...] = METHODS,
    parts: tuple[str, ...] = ("trust", "strength"),
) -> dict:
    """Both kinds of cells for a task (trust cells on two_step only), then the tables. Finished
    runs are reused, so the parts may also run as separate processes (`parts`) and an interrupted
    study resumes."""
    task = toy.TASKS[task_name]
    size = task.sizes[size_name]
    if size_name != "smoke":  # the strength study's high student, as in the trust study
        size = dataclasses.replace(size, student_sft_steps=strength.WARMUP_STEPS[task_name][-1])
    if task_name == "two_step" and "trust" in parts:
        trust.run_study(out / "trust", task_name, size, device, methods=methods, readout=False)
    if "strength" not in parts:
        return {}
    toy.run_methods(
        out / "strength",
        task_name,
        size,
        [(m, None) for m in methods],
        reuse=True,
        device=device,
        teacher_cache=out / "strength" / "teachers",
    )
    return {}
