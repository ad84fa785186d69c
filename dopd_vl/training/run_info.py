"""What a run used where a setting left the choice open (docs/design.md §2, §4.6): `run.json` and
the recipe as trained (`config.yaml`) in the output folder, which `dopd export` puts in the card,
and the same facts as metrics on the first line the run logs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from dopd_vl.training.config import TrainConfig, config_to_dict
from dopd_vl.version import __version__

__all__ = ["RunBackends", "run_info", "write_run_files", "backend_metrics"]


@dataclass
class RunBackends:
    """How this run computes: the loss backend, its self-check, chunking and generation."""

    loss_backend: str
    backend_check: object | None  # a BackendCheck, when the Triton backend was asked for
    loss_chunk_size: int
    generation: str  # eager | compiled: what rollouts use now
    generation_error: str | None = None  # why `auto` fell back to eager generation, if it did


def run_info(
    config: TrainConfig, backends: RunBackends, device, processes: int, train_records: int, skipped_records: int
) -> dict:
    """The contents of output_dir/run.json."""
    import transformers

    check = backends.backend_check.to_dict() if backends.backend_check is not None else None
    return {
        "versions": {"dopd_vl": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "device": str(device),
        "processes": processes,
        "loss_backend": {"requested": config.loss_backend, "used": backends.loss_backend, "self_check": check},
        "loss_chunk_size": backends.loss_chunk_size,
        "rollout_generation": {
            "requested": config.rollout.generation,
            "used": backends.generation,
            "fallback_reason": backends.generation_error,
        },
        "data": {
            "train": config.data.train,
            "train_records": train_records,
            "preflight": config.data.preflight,
            "skipped_records": skipped_records,
        },
    }


def write_run_files(output_dir: Path, config: TrainConfig, info: dict) -> None:
    """run.json and config.yaml (the main process calls this; the folder must exist)."""
    (output_dir / "run.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    recipe = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    (output_dir / "config.yaml").write_text(recipe, encoding="utf-8")


def backend_metrics(backends: RunBackends) -> dict:
    """`loss_backend/*` and `rollout/compiled`, logged on the run's first metrics line."""
    check = backends.backend_check
    metrics = {
        "loss_backend/triton": float(backends.loss_backend == "triton"),
        "rollout/compiled": float(backends.generation == "compiled"),
    }
    if check is not None:
        metrics["loss_backend/self_check_passed"] = float(check.passed)
        if check.max_rel_error is not None:
            metrics["loss_backend/self_check_rel_error"] = check.max_rel_error
    return metrics
