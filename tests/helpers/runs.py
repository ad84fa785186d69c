"""Shared by the training tests: the tiny text recipe on the arithmetic data, a few steps without
saving, a run's metrics."""

import json
import os
import sys
from pathlib import Path

from dopd_vl.training.config import load_config

from conftest import REPO

ARITH = REPO / "configs" / "data" / "arith" / "data.jsonl"
SHAPES = REPO / "configs" / "data" / "shapes" / "data.jsonl"
PYTHON = sys.executable
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def text_config(out: Path, *overrides: str):
    return load_config(REPO / "configs" / "tiny_text.yaml", [f"data.train={ARITH}", f"output_dir={out}", *overrides])


def run_steps(trainer, steps: int) -> list[dict]:
    from dopd_vl.training.step import sample_step

    """The body of Trainer.train without saving: rollout + step, `steps` times."""
    out = []
    for _ in range(steps):
        out.append(trainer.train_step(sample_step(trainer.run, trainer.step)))
    return out


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
