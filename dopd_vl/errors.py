"""Every exception dopd-vl raises on purpose, one family per domain; the CLI prints their message on
one line (no traceback) and exits non-zero (`Preempted`: 75). Library callers get the exception."""

from __future__ import annotations

PREEMPTED_EXIT_CODE = 75
"""Exit status of a run stopped by SIGTERM / SIGINT after checkpointing (EX_TEMPFAIL: try again,
i.e. requeue and `--resume`); distinct from 0 (finished) and 1 (an error)."""


class DopdError(Exception):
    """Base of every error dopd-vl raises on purpose."""

    exit_code: int = 1
    """The `dopd` command's exit status when this error stops it."""


# ------------------------------------------------------------------------------------- data
class DatasetError(DopdError, ValueError):
    """A bad dataset file or record; the message names the file, the record id and the field."""

    def __init__(self, message: str, *, file: str | None = None, record: str | None = None, field: str | None = None):
        self.file, self.record, self.field = file, record, field
        where = ", ".join(
            f"{k} {v}" for k, v in (("file", file), ("record", record), ("field", field)) if v is not None
        )
        super().__init__(f"{where}: {message}" if where else message)


class ImageOutsideRoots(DatasetError):
    """An image path that resolves outside every allowed root (docs/design.md §3.1)."""


# ---------------------------------------------------------------------------- recipes, models
class ConfigError(DopdError, ValueError):
    """A bad recipe key or value."""


class ModelError(DopdError, ValueError):
    """Models that cannot be used together (tokenizers, vocabularies) or cannot be loaded."""


class BackendCheckError(DopdError):
    """`loss_backend: triton` was asked for and the kernels failed their self-check (docs/design.md §2)."""


# ---------------------------------------------------------------------------------- training
class TrainingError(DopdError):
    """Training cannot go on (e.g. too many non-finite steps in a row)."""


class CollapseDetected(TrainingError):
    """The collapse guard stopped the run (`collapse_action: stop`); a checkpoint was written first."""


class Preempted(TrainingError):
    """SIGTERM / SIGINT: the run finished its step, wrote a checkpoint and stopped; `--resume`
    continues it exactly. The CLI exits with `PREEMPTED_EXIT_CODE` (75)."""

    exit_code = PREEMPTED_EXIT_CODE


class RunExistsError(TrainingError):
    """`dopd train` into an output_dir that already holds a run, without `--resume` or `--overwrite`:
    nothing was loaded and nothing of the earlier run was touched."""


class CheckpointError(DopdError):
    """A checkpoint that cannot be written, or loaded into this run."""


# ------------------------------------------------------------------------- after training
class ExportError(DopdError):
    """A run folder (or checkpoint) that cannot be exported."""


class HarnessError(DopdError):
    """A harness that is missing or cannot run what was asked."""
