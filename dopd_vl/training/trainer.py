"""The DOPD training loop (docs/design.md §4), one optimizer step at a time:

    rollout -> score views -> step statistics (thresholds) -> per micro-batch: plan, forward + backward
    -> clip, update -> log

`Trainer.train_step` is that step, on one screen. Everything the step uses was built once by
`setup_run` (run.py: models and scorers, data, optimizer, checkpointer, loss, engine); its parts are
the functions of step.py. The Trainer owns only the loop's state: the step counter, the skip
counts and the collapse guard.

Split invariance: every micro-batch's loss is its share of the whole step's loss (token weights
use the step's total sequence / token counts, thresholds use all the step's tokens gathered over
micro-batches and processes), and the DDP/FSDP gradient average over processes is undone by
scaling with the number of processes. So the step's value and gradient do not depend on how the
batch is split into micro-batches or processes.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from dopd_vl.distributed import any_process, reduce_sum
from dopd_vl.errors import CollapseDetected, Preempted, TrainingError
from dopd_vl.method.routing import REGIME_NAMES
from dopd_vl.progress import progress_bar
from dopd_vl.training.checkpointing import check_new_run, remove_run
from dopd_vl.training.config import TrainConfig, flat_config
from dopd_vl.training.guard import CollapseAlarm, CollapseGuard, collapse_message
from dopd_vl.training.metrics import LossShare, step_metrics
from dopd_vl.training.preemption import StopSignals
from dopd_vl.training.rollout import MicroBatch, rollout_metrics
from dopd_vl.training.run import Run, backend_metrics, setup_run
from dopd_vl.training.step import plan_micro_batch, sample_step, score_micro_batch, step_statistics, step_totals

logger = logging.getLogger(__name__)

__all__ = ["Trainer"]


class Trainer:
    """Trains a run. `Trainer(config)` builds the run (`setup_run`); `Trainer(run)` trains one built
    already. Public: `train`, `train_step`, `save`, and the read-only `run` and `step`."""

    def __init__(self, run: Run | TrainConfig, accelerator=None):
        self._run = run if isinstance(run, Run) else setup_run(run, accelerator)
        self._guard = CollapseGuard(self._run.config.collapse_guard)
        self._step = self._skipped_steps = self._consecutive_skips = self._step_tokens = 0

    @property
    def run(self) -> Run:
        return self._run

    @property
    def step(self) -> int:
        """Optimizer steps taken (the next step's 0-based index)."""
        return self._step

    # ------------------------------------------------------------------------------- the loop
    def train(self, resume: bool = False, overwrite: bool = False) -> Path:
        """Train to `max_steps`; the final student's folder. A run never overwrites another: an
        output_dir holding a run needs `resume` (continue it) or `overwrite` (its files removed first)."""
        run, c = self._run, self._run.config
        check_new_run(run.output_dir, resume, overwrite)  # every process sees the same folder
        if overwrite and run.accelerator.is_main_process:
            for path in remove_run(run.output_dir):
                logger.info("--overwrite: removed %s of the earlier run", path)
        run.accelerator.wait_for_everyone()
        if resume and (state := run.checkpointer.resume()) is not None:
            self._step, self._skipped_steps = state["step"], state["skipped_steps"]
            self._consecutive_skips = state["consecutive_skips"]
            self._guard.load_state_dict(state.get("guard", {}))
            run.engine.sync(run.models.student)  # the engine samples from the resumed weights
        if run.accelerator.is_main_process:
            run.output_dir.mkdir(parents=True, exist_ok=True)
        run.accelerator.wait_for_everyone()
        run.prepare_teacher_verdicts(reuse=resume)  # once per run, before the first step (the teacher is frozen)
        run.write_files()
        self._info = run.info()
        if c.report_to:
            run.accelerator.init_trackers("dopd", config=flat_config(c))
        bar = progress_bar(
            total=c.max_steps, initial=self._step, desc=run.objective.name, disable=not run.accelerator.is_main_process
        )
        with StopSignals() as stop:
            first_line = True
            while self._step < c.max_steps:
                stopping, first_line = self._train_one(bar, stop, first_line), False
                if self._step % c.save_steps == 0 or self._step == c.max_steps or stopping:
                    self.save()
                if stopping and self._step < c.max_steps:
                    bar.close()
                    raise Preempted(
                        f"stopped by a signal after step {self._step} of {c.max_steps}: checkpoint-{self._step} "
                        f"written in {run.output_dir}; continue with `dopd train ... --resume`"
                    )
        bar.close()
        final = run.checkpointer.export_final()
        if c.report_to:
            run.accelerator.end_training()
        return final

    def _train_one(self, bar, stop: StopSignals, first_line: bool) -> bool:
        """Rollout, step, guard and log one step; whether every process must stop after it."""
        run, a = self._run, self._run.accelerator
        started = time.perf_counter()
        micro_batches = sample_step(run, self._step)
        rollout_time = time.perf_counter() - started
        if (info := run.info()) != self._info:  # e.g. `auto` generation fell back to eager
            self._info = info
            run.write_files()
        skipped_before = self._skipped_steps
        metrics = self.train_step(micro_batches)
        metrics["time/rollout"] = metrics["rollout/generate_seconds"] = rollout_time
        applied = self._skipped_steps == skipped_before
        metrics.update(run.engine.after_update(run.models.student, applied, self._step))
        metrics["tokens_per_s"] = self._step_tokens / (time.perf_counter() - started)
        metrics.update(rollout_metrics(micro_batches, run.tokenizer, lambda t: reduce_sum(a, t)))
        alarm = self._guard.update(metrics) if run.config.collapse_action != "off" else None
        metrics["collapse_alarm"] = int(alarm is not None)
        newly_skipped = len(run.data.skipped) - run.data.preflight_skipped
        metrics["data/skipped_records"] = run.data.preflight_skipped + reduce_sum(a, newly_skipped)
        if first_line:  # how this run computes, on the first line it logs (also in run.json)
            metrics.update(backend_metrics(run.backends))
        self._log(metrics)
        if alarm is not None:
            self._on_collapse(alarm)
        shown = ("loss", *(f"frac/{r}" for r in REGIME_NAMES))
        # refresh=False: the postfix is drawn at the bar's own pace (a plain line every 30 s in a log file)
        bar.set_postfix({k: f"{metrics[k]:.3g}" for k in shown if k in metrics}, refresh=False)
        bar.update(1)
        return any_process(a, stop.received is not None)  # one signalled process stops them all

    def train_step(self, micro_batches: list[MicroBatch], update: bool = True) -> dict:
        """One optimizer step on this process's rollouts (docs/design.md §4), in the method's order.
        `update=False` stops with the step's gradients in `.grad` (the step counter stays)."""
        run, a, models = self._run, self._run.accelerator, self._run.models
        t0 = time.perf_counter()
        scored = [score_micro_batch(run, mb, self._step) for mb in micro_batches]  # §4.2: the targets, no gradient
        t1 = time.perf_counter()
        stats = step_statistics(run, scored)  # §4.3, §1.3: thresholds over every token of the step, all processes
        totals = step_totals(run, scored)
        models.student_call.train()
        run.engine.before_step()
        shares, student_logprobs = [], []
        for i, s in enumerate(scored):  # §4.4: each micro-batch's share of the step's loss
            plan = plan_micro_batch(run, s, stats, totals)  # route, weight, regime of each valid token
            with models.gradient_sync(a, last=i == len(scored) - 1):  # forward + backward
                out = models.student_call(
                    run.loss, s.student_view, plan=plan, targets=s.targets, with_logprob=run.engine.compares_logprobs
                )
                # DDP / FSDP average gradients over processes; the shares must add up instead.
                a.backward(out.loss * a.num_processes)
            shares.append(LossShare(float(out.loss.detach().double()), out.token_loss, out.student_entropy, plan))
            student_logprobs.append(out.student_logprob)
        models.release(run.scored_views)  # FSDP: the frozen models' heads, gathered for the step
        t2 = time.perf_counter()
        metrics = {"step": self._step + 1, "loss": reduce_sum(a, sum(share.loss for share in shares))}
        if update:
            metrics.update(self.apply_update(metrics["loss"]))  # clip, AdamW, EMA; a non-finite step is skipped
        metrics.update(step_metrics(run.objective, scored, shares, stats, a, run.config.diagnostics))  # §4.5
        metrics.update({"time/scoring": t1 - t0, "time/loss": t2 - t1})
        metrics.update(run.engine.health([mb.rollout for mb in micro_batches], student_logprobs, self._step))
        self._step_tokens = totals[1]
        return metrics

    def apply_update(self, loss: float) -> dict:
        """Clip and step, unless the loss or the gradient is not finite (then the step is skipped)."""
        run, c = self._run, self._run.config
        max_norm = c.optim.max_grad_norm if c.optim.max_grad_norm > 0 else math.inf
        grad_norm = run.models.clip_grad_norm(run.accelerator, max_norm)
        if math.isfinite(loss) and math.isfinite(grad_norm):
            run.optimizer.step()
            run.scheduler.step()
            run.models.update_ema(c.objective.ema_decay)
            self._consecutive_skips = 0
        else:
            self._skipped_steps += 1
            self._consecutive_skips += 1
            logger.warning(
                "step %d: non-finite loss (%s) or gradient norm (%s); skipped", self._step + 1, loss, grad_norm
            )
            if self._consecutive_skips > c.max_consecutive_skips:
                raise TrainingError(
                    f"{self._consecutive_skips} non-finite steps in a row (limit "
                    f"max_consecutive_skips={c.max_consecutive_skips}); lower optim.lr or check the data"
                )
        run.optimizer.zero_grad(set_to_none=True)
        self._step += 1
        return {"lr": run.scheduler.get_last_lr()[0], "grad_norm": grad_norm, "skipped_steps": self._skipped_steps}

    def _on_collapse(self, alarm: CollapseAlarm) -> None:
        """Warn once with what was seen and what avoids it; with `collapse_action: stop`, save and stop."""
        run = self._run
        message = collapse_message(alarm, run.objective, run.config)
        if run.config.collapse_action == "stop":
            self.save()
            raise CollapseDetected(f"{message} Stopped after saving checkpoint-{self._step} in {run.output_dir}.")
        logger.warning("%s Training goes on (collapse_action=stop would end the run here).", message)

    # -------------------------------------------------------------------------- saving and logging
    def save(self) -> None:
        """checkpoint-N of the current step, with the loop's state (skip counts, the guard)."""
        counters = {"skipped_steps": self._skipped_steps, "consecutive_skips": self._consecutive_skips}
        self._run.checkpointer.save(self._step, {**counters, "guard": self._guard.state_dict()})

    def _log(self, metrics: dict) -> None:
        run = self._run
        if run.config.report_to:
            run.accelerator.log(metrics, step=self._step)
        if run.accelerator.is_main_process:
            with open(run.output_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(metrics) + "\n")
