"""`dopd train` from the command line on a tiny vision-language recipe."""

import math
import subprocess

import pytest

from dopd_vl.method.routing import REGIME_NAMES

from conftest import REPO
from helpers.runs import ENV, PYTHON, SHAPES, read_metrics

pytestmark = pytest.mark.integration  # see pyproject.toml's markers


# -------------------------------------------------------------------------------- dopd train CLI
def test_dopd_train_tiny_vlm_cli(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    run = tmp_path / "vlm"
    done = subprocess.run(
        [
            PYTHON,
            "-m",
            "dopd_vl.cli",
            "train",
            str(REPO / "configs" / "tiny_vlm.yaml"),
            f"data.train={SHAPES}",
            f"output_dir={run}",
            "max_steps=2",
            "save_steps=2",
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [1, 2]
    names = [
        "step",
        "loss",
        "lr",
        "threshold/A",
        "threshold/q_student",
        "threshold/q_teacher",
        "entropy/student",
        "entropy/teacher_priv",
        "response_length",
        "clipped_frac",
        "accuracy",
        "time/rollout",
        "time/scoring",
        "time/loss",
        "tokens_per_s",
        "skipped_steps",
    ]
    names += [f"{k}/{r}" for k in ("frac", "loss", "A") for r in REGIME_NAMES]
    for m in metrics:
        assert set(names) <= set(m), set(names) - set(m)
        assert sum(m[f"frac/{r}"] for r in REGIME_NAMES) == pytest.approx(1.0)
        assert all(math.isfinite(m[k]) for k in names)
    for folder in (run / "checkpoint-2" / "model", run / "final"):
        model = AutoModelForImageTextToText.from_pretrained(folder)
        assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
        assert type(AutoProcessor.from_pretrained(folder)).__name__ == "Qwen3VLProcessor"
