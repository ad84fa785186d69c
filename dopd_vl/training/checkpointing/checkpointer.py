"""A run's checkpoints (docs/design.md §4.6): save, resume and the final student, for one process
or many, whole (DDP) or sharded (FSDP2). The file format and its safety live in files.py; this
module decides who writes what, and keeps every process in step when a write fails.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

from dopd_vl.distributed import any_process
from dopd_vl.errors import CheckpointError
from dopd_vl.models.folders import save_model_folder
from dopd_vl.models.parallel import full_state_dict
from dopd_vl.training.checkpointing.files import (
    latest_checkpoint,
    load_checkpoint_state,
    load_sharded_state,
    load_student_weights,
    new_checkpoint_folder,
    save_checkpoint,
    save_sharded_state,
)
from dopd_vl.training.config import TrainConfig, config_to_dict

logger = logging.getLogger(__name__)

__all__ = ["Checkpointer"]


class Checkpointer:
    """Writes `checkpoint-N` folders of a run and reads them back; `models` is the run's RunModels."""

    def __init__(self, config: TrainConfig, accelerator, models, optimizer, scheduler):
        self.config, self.accelerator, self.models = config, accelerator, models
        self.optimizer, self.scheduler = optimizer, scheduler
        self.output_dir = Path(config.output_dir)

    def _any_failed(self, failed: bool) -> bool:
        return any_process(self.accelerator, failed)  # also a barrier

    def _student(self):
        """The student module whose weights a checkpoint holds (DDP's wrapper unwrapped)."""
        m = self.models
        return m.student if m.sharded else self.accelerator.unwrap_model(m.student_call).model

    def save(self, step: int, state: dict) -> None:
        """checkpoint-N from the main process (under FSDP every process writes its shards first);
        a failed write (a full disk) stops every process."""
        self.accelerator.wait_for_everyone()
        main, sharded, failure = self.accelerator.is_main_process, self.models.sharded, None
        if sharded and self._any_failed((failure := self._save_shards(step)) is not None):  # every shard or none
            if main:
                shutil.rmtree(self.output_dir / f".tmp-checkpoint-{step}", ignore_errors=True)
            raise failure or CheckpointError(
                f"a process could not write its shards of checkpoint-{step} (its message says why)"
            )
        if main:
            ema = self.models.privileged_mode == "ema" and not sharded
            extra = {f"ema.{k}": v for k, v in self.models.privileged_student.state_dict().items()} if ema else None
            state = {**state, "processes": self.accelerator.num_processes, "parallel": self.config.parallel}
            try:
                save_checkpoint(
                    self.output_dir,
                    step,
                    model=self._student(),
                    processing=self.models.processing,
                    optimizer=self.optimizer,
                    scheduler=self.scheduler,
                    state=state,
                    config=config_to_dict(self.config),
                    extra_tensors=extra,
                    keep=self.config.save_total_limit,
                    sharded=sharded,
                )
            except CheckpointError as err:
                failure = err
        if self._any_failed(failure is not None):  # the other processes learn of the failure
            raise failure or CheckpointError(f"a process could not write checkpoint-{step} (its message says why)")

    def _save_shards(self, step: int) -> CheckpointError | None:
        """Every process's shards into `.tmp-checkpoint-N/sharded` (§4.6); the failure, if any."""
        from torch.distributed.checkpoint.api import CheckpointException

        if self.accelerator.is_main_process:
            new_checkpoint_folder(self.output_dir, step)
        self.accelerator.wait_for_everyone()
        tmp = self.output_dir / f".tmp-checkpoint-{step}"
        try:
            main = self.accelerator.is_main_process
            save_sharded_state(tmp, self.models.student, self.optimizer, self.models.sharded_frozen(), main=main)
            return None
        except (Exception, CheckpointException) as err:  # a full disk, a failing filesystem; DCP wraps them
            return CheckpointError(f"writing the shards of checkpoint-{step} into {tmp} failed: {str(err)[:500]}")

    def resume(self) -> dict | None:
        """Load the newest checkpoint into the run's models, optimizer and scheduler; its state
        (step, counters, the guard's history), or None when there is none."""
        checkpoint = latest_checkpoint(self.output_dir)
        if checkpoint is None:
            logger.warning("--resume: no checkpoint in %s; starting from step 0", self.output_dir)
            return None
        state = json.loads((checkpoint / "state.json").read_text())
        sharded = self.models.sharded
        if sharded != (checkpoint / "sharded").is_dir():
            parallel = state.get("parallel", "ddp")
            raise CheckpointError(
                f"{checkpoint} was written with parallel: {parallel}; resume it with the same setting"
            )
        if sharded:
            processes = self.accelerator.num_processes
            if state.get("processes") != processes:
                logger.warning(
                    "%s was written by %s processes, this run has %d: the shards are re-cut as they load, but the "
                    "steps that follow split their data differently from a run that kept %s",
                    checkpoint,
                    state.get("processes"),
                    processes,
                    state.get("processes"),
                )
            load_sharded_state(checkpoint, self.models.student, self.optimizer, self.models.sharded_frozen())
        else:
            load_student_weights(self._student(), checkpoint, lora=self.config.lora.enabled)
        state, extra = load_checkpoint_state(checkpoint, None if sharded else self.optimizer, self.scheduler)
        if extra:
            self.models.privileged_student.load_state_dict({k.removeprefix("ema."): v for k, v in extra.items()})
        metrics = self.output_dir / "metrics.jsonl"
        if self.accelerator.is_main_process and metrics.exists():  # drop lines logged after the checkpoint
            lines = metrics.read_text().splitlines()
            kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= state["step"]]
            metrics.write_text("".join(line + "\n" for line in kept))
        logger.info("resumed from %s at step %d", checkpoint, state["step"])
        return state

    def export_final(self) -> Path:
        """The trained student as a plain model folder (LoRA merged), loadable with from_pretrained."""
        final = self.output_dir / "final"
        self.accelerator.wait_for_everyone()
        weights = (
            full_state_dict(self.models.student) if self.models.sharded else None
        )  # gathered onto the main process
        if self.accelerator.is_main_process:
            model = self._student()
            if self.config.lora.enabled:
                model = copy.deepcopy(model).merge_and_unload()
            save_model_folder(model, self.models.processing, final, state_dict=weights)
        self.accelerator.wait_for_everyone()
        return final
