"""The DOPD training loop (docs/design.md §4), one optimizer step at a time:

    rollout -> score views -> step statistics (thresholds) -> route, weigh, loss + backward -> clip, update -> log

`Trainer.train_step` is the step, in that order, on one screen. Everything else a run needs is a
component set up once: the models and who scores which view (setup.py), the routed loss
(routed_loss.py), the checkpoints (checkpointer.py), the run's metadata (run_info.py) and the
collectives (dopd_vl/models/parallel.py).

Split invariance: every micro-batch's loss is its share of the whole step's loss (token weights
use the step's total sequence / token counts, thresholds use all the step's tokens gathered over
micro-batches and processes), and the DDP/FSDP gradient average over processes is undone by
scaling with the number of processes. So the step's value and gradient do not depend on how the
batch is split into micro-batches or processes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dopd_vl.errors import CollapseDetected, ConfigError, DopdError, Preempted, TrainingError
from dopd_vl.loss.routed import token_weights
from dopd_vl.method.objectives import build_objective
from dopd_vl.method.routing import REGIME_NAMES, assign_regimes
from dopd_vl.method.views import DIAGNOSTIC_VIEWS, SCORING_VIEWS
from dopd_vl.models.parallel import gather, reduce_sum, sum_over_processes
from dopd_vl.training.checkpointer import Checkpointer
from dopd_vl.training.config import TrainConfig, flat_config
from dopd_vl.training.engines import engine_logprob_mismatch
from dopd_vl.training.guard import CollapseAlarm, CollapseGuard, collapse_message
from dopd_vl.training.metrics import LossShare, step_metrics
from dopd_vl.training.preemption import StopSignals
from dopd_vl.training.rollout import MicroBatch, rollout_metrics, seed_step, step_prompt_indices
from dopd_vl.training.routed_loss import RoutedLoss
from dopd_vl.training.run_info import backend_metrics, run_info, write_run_files
from dopd_vl.training.scoring import ScoredBatch, score_micro_batch
from dopd_vl.training.setup import setup_data, setup_loss_backend, setup_models, setup_optimizer, setup_rollout_engine

logger = logging.getLogger(__name__)

__all__ = ["Trainer"]


class Trainer:
    def __init__(self, config: TrainConfig, accelerator=None):
        from accelerate import Accelerator

        self.config = c = config
        cpu = c.device == "cpu"
        self.accelerator = accelerator or Accelerator(log_with=c.report_to or None, project_dir=c.output_dir, cpu=cpu)
        self.device = self.accelerator.device
        if self.accelerator.distributed_type.value == "FSDP" and c.parallel == "ddp":  # it would wrap the student again
            raise ConfigError(
                "the launch configuration asks accelerate for FSDP; dopd-vl shards the models itself: set parallel: "
                "fsdp in the recipe and launch with configs/accelerate/fsdp.yaml (docs/design.md §4.6)"
            )
        self.gather = functools.partial(gather, self.accelerator)
        self.reduce_sum = functools.partial(reduce_sum, self.accelerator)
        self.objective = build_objective(c.objective)
        self.output_dir = Path(c.output_dir)
        # The views scored each step: the objective's, plus every view the diagnostics read (§1.11).
        wanted = set(self.objective.views) | (set(DIAGNOSTIC_VIEWS) if c.diagnostics else set())
        self.scored_views = tuple(v for v in SCORING_VIEWS if v in wanted)

        self.models = setup_models(c, self.objective, self.scored_views, self.device)
        m = self.models
        self.student, self.tokenizer, self.vocab_size = m.student, m.tokenizer, m.vocab_size
        self.data = setup_data(c, m, self.scored_views, self.objective, progress=self.accelerator.is_main_process)
        self.records, self.adapters = self.data.records, self.data.adapters
        self.optimizer, self.scheduler = setup_optimizer(c, self.models, self.accelerator)
        self.checkpointer = Checkpointer(c, self.accelerator, self.models, self.optimizer, self.scheduler)
        self.backends = setup_loss_backend(c, self.objective, self.models, self.scored_views, self.accelerator)
        b = self.backends
        self.routed_loss = RoutedLoss(self.objective, self.vocab_size, b.loss_chunk_size, b.loss_backend)
        self.engine = setup_rollout_engine(c, self.models, self.data, self.accelerator)
        self.guard = CollapseGuard(c.collapse_guard)
        self.step = self.skipped_steps = self.consecutive_skips = 0

    # ------------------------------------------------------------------------------- the loop
    def train(self, resume: bool = False) -> Path:
        c = self.config
        if resume and (state := self.checkpointer.resume()) is not None:
            self.step, self.skipped_steps = state["step"], state["skipped_steps"]
            self.consecutive_skips = state["consecutive_skips"]
            self.guard.load_state_dict(state.get("guard", {}))
            self.engine.sync(self.models.student)  # the engine samples from the resumed weights
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self._write_run_files()
        if c.report_to:
            self.accelerator.init_trackers("dopd", config=flat_config(c))
        quiet = not self.accelerator.is_main_process
        bar = tqdm(total=c.max_steps, initial=self.step, desc=self.objective.name, disable=quiet)
        with StopSignals() as stop:
            first_line = True
            while self.step < c.max_steps:
                stopping, first_line = self._train_one(bar, stop, first_line), False
                if self.step % c.save_steps == 0 or self.step == c.max_steps or stopping:
                    self.save()
                if stopping and self.step < c.max_steps:
                    bar.close()
                    raise Preempted(
                        f"stopped by a signal after step {self.step} of {c.max_steps}: checkpoint-{self.step} written "
                        f"in {self.output_dir}; continue with `dopd train ... --resume`"
                    )
        bar.close()
        final = self.checkpointer.export_final()
        if c.report_to:
            self.accelerator.end_training()
        return final

    def _train_one(self, bar, stop: StopSignals, first_line: bool) -> bool:
        """Rollout, step, guard and log one step; whether every process must stop after it."""
        started = time.perf_counter()
        micro_batches = self.sample()
        rollout_time = time.perf_counter() - started
        skipped_before = self.skipped_steps
        metrics = self.train_step(micro_batches)
        metrics["time/rollout"] = metrics["rollout/generate_seconds"] = rollout_time
        if self.engine.needs_sync:  # a skipped step left the weights as the engine holds them
            synced = self.skipped_steps == skipped_before
            metrics["rollout/sync_seconds"] = self.engine.sync(self.models.student) if synced else 0.0
            metrics["rollout/weight_sync"] = int(synced)
            self.engine.check_mismatch(metrics["rollout/logprob_mismatch"], self.step)
        metrics["tokens_per_s"] = self.last_step_tokens / (time.perf_counter() - started)
        metrics.update(rollout_metrics(micro_batches, self.tokenizer, self.reduce_sum))
        alarm = self.guard.update(metrics) if self.config.collapse_action != "off" else None
        metrics["collapse_alarm"] = int(alarm is not None)
        newly_skipped = len(self.data.skipped) - self.data.preflight_skipped
        metrics["data/skipped_records"] = self.data.preflight_skipped + self._sum(newly_skipped)
        if first_line:  # how this run computes, on the first line it logs (also in run.json)
            metrics.update(backend_metrics(self.backends))
        self._log(metrics)
        if alarm is not None:
            self._on_collapse(alarm)
        bar.update(1)
        shown = ("loss", *(f"frac/{r}" for r in REGIME_NAMES))
        bar.set_postfix({k: f"{metrics[k]:.3g}" for k in shown if k in metrics})
        return self._sum(float(stop.received is not None)) > 0  # one signalled process stops them all

    def sample(self) -> list[MicroBatch]:
        """This process's micro-batches of the current step, with rollouts seeded by (seed, step, process)."""
        c, a = self.config, self.accelerator
        seed_step(c.seed, self.step, a.process_index)
        o = c.optim
        n = len(self.records)
        batches = step_prompt_indices(
            self.step, c.seed, n, o.batch_size, o.gradient_accumulation_steps, a.num_processes, a.process_index
        )
        return [self.rollout(indices) for indices in batches]

    def rollout(self, record_indices: list[int]) -> MicroBatch:
        """Sample `num_generations` responses per record from the student on the plain view."""
        records = [self._present_record(i) for i in record_indices]
        try:
            return MicroBatch(records, self._sample(records))
        except DopdError:
            raise
        except Exception as err:  # noqa: BLE001 - `auto` falls back from a failed compile; anything else raises again
            if not (self.config.rollout.generation == "auto" and self.backends.generation == "compiled"):
                raise
            self.backends.generation_error = f"{type(err).__name__}: {err}"[:500]
            logger.warning(
                "rollout.generation auto: compiled generation failed (%s); generating eagerly",
                self.backends.generation_error,
            )
            self.backends.generation = "eager"
            self._write_run_files()
            return MicroBatch(records, self._sample(records))

    def _sample(self, records: list[dict]):
        """The student's responses from the run's rollout engine (§4.1)."""
        config = dataclasses.replace(self.config.rollout, generation=self.backends.generation)
        return self.engine.sample(self.models, self.adapters["student"], records, config)

    def train_step(self, micro_batches: list[MicroBatch], update: bool = True) -> dict:
        """One optimizer step on this process's rollouts (docs/design.md §4), in the method's order.
        `update=False` stops with the step's gradients in `.grad`."""
        t0 = time.perf_counter()
        scored = [self.score(mb) for mb in micro_batches]  # §4.2: the target views, without gradient
        t1 = time.perf_counter()
        stats = self.step_statistics(scored)  # §4.3: thresholds over every token of the step, all processes
        masks = [s.student_view.response_mask for s in scored]
        sequences, tokens = (
            self._sum(sum(int(m.any(-1).sum()) for m in masks)),
            self._sum(sum(int(m.sum()) for m in masks)),
        )
        self.models.student_call.train()
        if hasattr(self.engine, "sleep"):
            self.engine.sleep()  # sleep_mode: the engine's KV cache is freed for the step
        shares, mismatch = [], [0.0, 0]
        for i, s in enumerate(scored):  # §4.4: each micro-batch's share of the step's loss
            local = (
                stats
                if self.config.objective.threshold_scope == "global"
                else self.objective.step_statistics(s.signals, s.prune_keys)
            )
            mask = s.student_view.response_mask
            route = self.routes(s, local)  # route
            route_bt = torch.full(mask.shape, -1, dtype=torch.long, device=self.device).masked_scatter(mask, route)
            weight = token_weights(self.objective, mask, route_bt, local, s.signals, s.groups, sequences, tokens)[
                mask
            ]  # weigh
            with self.models.gradient_sync(self.accelerator, last=i == len(scored) - 1):  # forward + backward
                out = self.models.student_call(
                    self.routed_loss, s.student_view, route=route, token_weight=weight, targets=s.targets,
                    with_logprob=self.engine.needs_sync,
                )  # fmt: skip
                # DDP / FSDP average gradients over processes; the shares must add up instead.
                self.accelerator.backward(out.loss * self.accelerator.num_processes)
            regime = (
                assign_regimes(s.signals, local)
                if s.signals is not None and s.signals.advantage_gap is not None
                else None
            )
            shares.append(
                LossShare(float(out.loss.detach().double()), out.token_loss, out.student_entropy, regime, route)
            )
            if out.student_logprob is not None:  # the engine's log-probs against the trainer's own
                total, count = engine_logprob_mismatch([micro_batches[i].rollout], [out.student_logprob])
                mismatch = [mismatch[0] + total, mismatch[1] + count]
        self.models.release(self.scored_views)  # FSDP: the frozen models' heads, gathered for the step
        t2 = time.perf_counter()
        metrics = {"step": self.step + 1, "loss": self._sum(sum(share.loss for share in shares))}
        if update:
            metrics.update(self.apply_update(metrics["loss"]))  # clip, AdamW, EMA; a non-finite step is skipped
        metrics.update(
            step_metrics(self.objective, scored, shares, stats, self.gather, self.config.diagnostics)
        )  # §4.5
        metrics.update({"time/scoring": t1 - t0, "time/loss": t2 - t1})
        if self.engine.needs_sync:
            total, count = self.reduce_sum(torch.tensor(mismatch, dtype=torch.float64)).tolist()
            metrics["rollout/logprob_mismatch"] = total / max(count, 1)
        self.last_step_tokens = tokens
        return metrics

    def apply_update(self, loss: float) -> dict:
        """Clip and step, unless the loss or the gradient is not finite (then the step is skipped)."""
        c, m = self.config, self.models
        max_norm = c.optim.max_grad_norm if c.optim.max_grad_norm > 0 else math.inf
        grad_norm = m.clip_grad_norm(self.accelerator, max_norm)
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.optimizer.step()
            self.scheduler.step()
            m.update_ema(c.objective.ema_decay)
            self.consecutive_skips = 0
        else:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            logger.warning(
                "step %d: non-finite loss (%s) or gradient norm (%s); skipped", self.step + 1, loss, grad_norm
            )
            if self.consecutive_skips > c.max_consecutive_skips:
                raise TrainingError(
                    f"{self.consecutive_skips} non-finite steps in a row (limit "
                    f"max_consecutive_skips={c.max_consecutive_skips}); "
                    "lower optim.lr or check the data"
                )
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm, "skipped_steps": self.skipped_steps}

    # -------------------------------------------------------------------------- the step's parts
    def score(self, mb: MicroBatch) -> ScoredBatch:
        """Build the views the objective needs and score the target views without gradient."""
        return score_micro_batch(
            self.models, self.adapters, self.objective, self.config, mb, self.scored_views, self.step, self.device
        )

    def routes(self, s: ScoredBatch, stats: dict[str, float]) -> torch.Tensor:
        """The route index of each valid token of a scored micro-batch, flattened ([N]; -1: no loss)."""
        valid = torch.ones(int(s.student_view.response_mask.sum()), dtype=torch.bool, device=self.device)
        return self.objective.assign_routes(valid, s.signals, stats, s.prune_keys)

    def step_statistics(self, scored: list[ScoredBatch]) -> dict[str, float]:
        """Thresholds and counts over every valid token of the step, on every process (§1.3)."""
        if not self.objective.needs_signals and self.objective.router != "prune":
            return {}
        parts = [s.signals for s in scored]
        gathered = None
        if parts[0] is not None:
            gathered = parts[0].map(lambda name, _: self.gather(torch.cat([getattr(p, name) for p in parts])))
        keys = self.gather(torch.cat([s.prune_keys for s in scored])) if self.objective.router == "prune" else None
        return self.objective.step_statistics(gathered, keys)

    def _on_collapse(self, alarm: CollapseAlarm) -> None:
        """Warn once with what was seen and what avoids it; with `collapse_action: stop`, save and stop."""
        message = collapse_message(alarm, self.objective, self.config)
        if self.config.collapse_action == "stop":
            self.save()
            raise CollapseDetected(f"{message} Stopped after saving checkpoint-{self.step} in {self.output_dir}.")
        logger.warning("%s Training goes on (collapse_action=stop would end the run here).", message)

    # ---------------------------------------------------------------- data, saving and logging
    def _present_record(self, index: int) -> dict:
        """Record `index`, or under `skip` the next one whose image files are still all there."""
        record, newly_skipped = self.data.pick(index, self.step + 1)
        if newly_skipped:
            self.data.write_skipped(self.output_dir, self.accelerator.is_main_process, self.accelerator.process_index)
        return record

    def save(self) -> None:
        counters = {"skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips}
        self.checkpointer.save(self.step, {**counters, "guard": self.guard.state_dict()})

    def run_info(self) -> dict:
        """What this run used where a setting left the choice open: written to output_dir/run.json."""
        n = self.accelerator.num_processes
        return run_info(self.config, self.backends, self.device, n, len(self.records), self.data.preflight_skipped)

    def _write_run_files(self) -> None:
        if self.accelerator.is_main_process and self.output_dir.is_dir():
            write_run_files(self.output_dir, self.config, self.run_info())
        self.data.write_skipped(self.output_dir, self.accelerator.is_main_process, self.accelerator.process_index)

    def _sum(self, value) -> float:
        return sum_over_processes(self.accelerator, value)

    def _log(self, metrics: dict) -> None:
        if self.config.report_to:
            self.accelerator.log(metrics, step=self.step)
        if self.accelerator.is_main_process:
            with open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(metrics) + "\n")
