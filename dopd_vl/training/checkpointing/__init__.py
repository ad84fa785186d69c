"""A run's checkpoints (docs/design.md §4.6): `files` is the on-disk format and its safety (written
whole or not at all, read back with weights_only / safetensors); `checkpointer` decides who writes
what across processes, resumes and exports the final student."""

from dopd_vl.training.checkpointing.checkpointer import Checkpointer
from dopd_vl.training.checkpointing.files import check_new_run, latest_checkpoint, load_student_weights, remove_run

__all__ = ["Checkpointer", "check_new_run", "remove_run", "latest_checkpoint", "load_student_weights"]
