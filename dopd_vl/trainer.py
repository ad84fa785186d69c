"""The DOPD training loop (docs/design.md §4), one optimizer step at a time:

    rollout -> score views -> step statistics (thresholds) -> loss + backward -> update -> log

Split invariance: every micro-batch's loss is its share of the whole step's loss (token weights
use the step's total sequence / token counts, thresholds use all the step's tokens gathered over
micro-batches and processes), and the DDP/FSDP gradient average over processes is undone by
scaling with the number of processes. So the step's value and gradient do not depend on how the
batch is split into micro-batches or processes.

The file is one class of about 590 lines: its setup (models, data, the backend self-check), the
step (`train_step`, one screen) and the phases it calls, the run's metadata and the checkpoint,
preemption and skipped-record hooks; what is not the trainer's own lives with its concept
(preflight, preemption, checkpoint, loss); splitting the class further would scatter the step.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
import yaml

from dopd_vl.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint_state,
    load_sharded_state,
    load_student_weights,
    new_checkpoint_folder,
    save_checkpoint,
    save_sharded_state,
)
from dopd_vl.config import TrainConfig, config_to_dict, flat_config
from dopd_vl.data import records_root
from dopd_vl.image_roots import image_roots
from dopd_vl.diagnosis import DIAGNOSTIC_VIEWS, summarise_diagnostics, token_diagnostics
from dopd_vl.errors import ConfigError, DatasetError, DopdError
from dopd_vl.guard import CollapseAlarm, CollapseGuard
from dopd_vl.models import (
    check_same_tokenizer,
    eos_token_ids,
    load_model,
    load_processing,
    never_sampled_token_ids,
    output_embedding_weight,
    resolve_dtype,
    save_model_folder,
    tokenizer_of,
    with_lora,
)
from dopd_vl.modality import PRIVILEGED_VIEWS, TEACHER_VIEWS, make_adapter
from dopd_vl.loss import StudentLoss, TargetStates, auto_chunk_size, resolve_loss_backend, student_loss
from dopd_vl.loss.selfcheck import checked_triton_backend
from dopd_vl.objectives import SCORING_VIEWS, build_objective
from dopd_vl.parallel import ModelCall, call_model, full_state_dict, generate_with_full_weights, is_sharded, release, shard_model
from dopd_vl.preemption import PREEMPTED_EXIT_CODE, StopSignals
from dopd_vl.preflight import RecordPicker, preflight_records
from dopd_vl.rollout import MicroBatch, resolve_generation, rollout_metrics, sample_responses
from dopd_vl.routing import REGIME_NAMES, TokenSignals, assign_regimes
from dopd_vl.scoring import score_views
from dopd_vl.views import ViewBatch, build_views

logger = logging.getLogger(__name__)

__all__ = ["Trainer", "MicroBatch", "TrainingError", "CollapseDetected", "Preempted", "StudentLoss"]


class TrainingError(DopdError):
    """Training cannot go on (e.g. too many non-finite steps in a row)."""


class CollapseDetected(TrainingError):
    """The collapse guard stopped the run (`collapse_action: stop`); a checkpoint was written first."""


class Preempted(TrainingError):
    """SIGTERM / SIGINT: the run finished its step, wrote a checkpoint and stopped; `--resume`
    continues it exactly. The CLI exits with `PREEMPTED_EXIT_CODE` (75)."""

    exit_code = PREEMPTED_EXIT_CODE


@dataclass
class _Scored:
    student_view: ViewBatch
    targets: dict[str, TargetStates]
    signals: TokenSignals | None  # over the valid tokens, flattened
    prune_keys: Tensor | None
    groups: Tensor  # [B] the prompt (record) index of each response: VA-OPD's rollout groups


@dataclass
class _Share:
    """One micro-batch's share of the step's loss, after its backward."""

    loss: float
    token_loss: Tensor  # [N] route-weighted divergence per valid token (detached)
    entropy: Tensor  # [N] the student's entropy per valid token
    regime: Tensor | None  # [N] DOPD regime when the objective has DOPD's signals
    route: Tensor  # [N] route index (-1: no loss)


class Trainer:
    def __init__(self, config: TrainConfig, accelerator=None):
        from accelerate import Accelerator
        from transformers import get_cosine_schedule_with_warmup

        self.config = c = config
        self.accelerator = accelerator or Accelerator(log_with=c.report_to or None, project_dir=c.output_dir, cpu=c.device == "cpu")
        self.device = self.accelerator.device
        if self.accelerator.distributed_type.value == "FSDP" and c.parallel == "ddp":  # accelerate's plugin would wrap the student again
            raise ConfigError("the launch configuration asks accelerate for FSDP; dopd-vl shards the models itself: set parallel: fsdp "
                              "in the recipe and launch with configs/accelerate/fsdp.yaml (docs/design.md §4.6)")
        self.objective = build_objective(c.objective)
        self.output_dir = Path(c.output_dir)
        # The views scored each step: the objective's, plus every view the diagnostics read (§1.11).
        wanted = set(self.objective.views) | (set(DIAGNOSTIC_VIEWS) if c.diagnostics else set())
        self.scored_views = tuple(v for v in SCORING_VIEWS if v in wanted)

        # Models: the student is trained; the teacher is frozen, in its own dtype, never in the optimizer.
        # Objectives without a teacher view (self_distill, vision_opd) do not load its weights.
        self.student = load_model(c.student.name_or_path, resolve_dtype(c.student.dtype, self.device), c.student.trust_remote_code)
        self.student_processing = load_processing(c.student.name_or_path, c.student.trust_remote_code)
        self.teacher = None
        teacher_processing = self.student_processing
        if c.teacher.name_or_path:
            teacher_processing = load_processing(c.teacher.name_or_path, c.teacher.trust_remote_code)
        if TEACHER_VIEWS & set(self.scored_views):
            if not c.teacher.name_or_path:
                needs = f"objective {self.objective.name!r}" if TEACHER_VIEWS & set(self.objective.views) else "diagnostics (dopd diagnose)"
                raise ConfigError(f"{needs} scores teacher views {sorted(TEACHER_VIEWS & set(self.scored_views))}: set teacher.name_or_path")
            self.teacher = load_model(c.teacher.name_or_path, resolve_dtype(c.teacher.dtype, self.device), c.teacher.trust_remote_code).eval().requires_grad_(False)
        elif c.teacher.name_or_path:
            logger.info("objective %s uses no teacher view: the teacher's weights are not loaded", self.objective.name)
        self.vocab_size = check_same_tokenizer(self.student_processing, teacher_processing, self.student, self.teacher)
        self.tokenizer = tokenizer_of(self.student_processing)
        if c.gradient_checkpointing:
            # transformers 5 renamed it (the old name warns of removal in v6)
            getattr(self.student, "activation_checkpointing_enable", self.student.gradient_checkpointing_enable)()
        if c.lora.enabled:
            self.student = with_lora(self.student, c.lora)
        self.privileged_student = self._make_privileged_student()
        self.reference_model = self._make_reference_model()

        root = image_roots(records_root(c.data.train), c.data.image_roots)  # where image paths may lead (§3.1)
        self.adapters = {
            "student": make_adapter(self.student_processing, c.data.prompt, image_root=root),
            "teacher": make_adapter(teacher_processing, c.data.prompt, image_root=root),
        }
        d = c.data
        self.records, self.skipped_records = preflight_records(  # §3.1: faulty records stop here (fail) or are left out (skip)
            d, self.adapters["student"], max_prompt_length=c.rollout.max_prompt_length, privileged=bool(PRIVILEGED_VIEWS & set(self.scored_views)),
            progress=self.accelerator.is_main_process)
        self.preflight_skipped = len(self.skipped_records)
        self.picker = RecordPicker(self.records, root, d.train, d.on_error)
        if self.objective.name == "vision_opd":
            _check_image_context(self.records, c.data.train)
        self.eos_token_ids = eos_token_ids(self.student_processing, self.student)
        self.suppress_ids = never_sampled_token_ids(self.student_processing, self.student)

        self.sharded = c.parallel == "fsdp"
        if self.sharded and not torch.distributed.is_initialized():  # one process: FSDP still needs a group (of one)
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
        if self.sharded:  # §4.6: ours, not accelerate's: every model behind a wrapper whose forward FSDP hooks
            self.loss_module = self._shard(StudentLoss(self.student))
            self.teacher = self._shard(ModelCall(self.teacher)) if self.teacher is not None and c.teacher.shard is not False else self.teacher
            frozen = {id(m): m for m in (self.privileged_student, self.reference_model) if m is not None}
            sharded = {key: self._shard(ModelCall(m)) for key, m in frozen.items()}
            self.privileged_student = sharded.get(id(self.privileged_student))
            self.reference_model = sharded.get(id(self.reference_model))
        params = [p for p in self.student.parameters() if p.requires_grad]  # after sharding: FSDP replaces them
        self.optimizer = torch.optim.AdamW(params, lr=c.optim.lr, weight_decay=c.optim.weight_decay, betas=tuple(c.optim.adam_betas))
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, c.optim.warmup_steps, c.max_steps)
        if not self.sharded:
            self.loss_module, self.optimizer = self.accelerator.prepare(StudentLoss(self.student), self.optimizer)
        for model in {id(m): m for m in (self.teacher, self.privileged_student, self.reference_model) if m is not None}.values():
            if not is_sharded(model):
                model.to(self.device)
        self.step = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.guard = CollapseGuard(c.collapse_guard)
        self.loss_backend = resolve_loss_backend(c.loss_backend, self.device)
        self.backend_check = None
        if self.loss_backend == "triton":  # §2: the kernels check themselves first; `auto` may fall back to torch
            heads = {v: call_model(self._scoring_model(v), output_embedding_weight) for v in self.objective.views}
            self.loss_backend, self.backend_check = checked_triton_backend(
                c.loss_backend, self.objective, call_model(self._live_student(), output_embedding_weight), heads, self.vocab_size, seed=c.seed,
                any_failed=lambda failed: self._sum(float(failed)) > 0)
            for model in (self.loss_module, *self._frozen_scorers()):
                release(model)
        self.loss_chunk_size = auto_chunk_size(self.device, self.vocab_size, backend=self.loss_backend) if c.loss_chunk_size == "auto" else c.loss_chunk_size
        self.rollout_config = dataclasses.replace(c.rollout, generation=resolve_generation(c.rollout.generation, self.device))
        self.generation_error: str | None = None  # why `auto` fell back to eager generation, if it did

    # ------------------------------------------------------------------------------- the loop
    def train(self, resume: bool = False) -> Path:
        c = self.config
        if resume:
            self._resume()
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self._write_run_info()
        if c.report_to:
            self.accelerator.init_trackers("dopd", config=flat_config(c))
        bar = tqdm(total=c.max_steps, initial=self.step, desc=f"{self.objective.name}", disable=not self.accelerator.is_main_process)
        with StopSignals() as stop:
            self._train_steps(bar, stop)
        bar.close()
        final = self.export_final()
        if c.report_to:
            self.accelerator.end_training()
        return final

    def _train_steps(self, bar, stop: StopSignals) -> None:
        """Steps until max_steps; a stop signal ends the loop at a step boundary, after a checkpoint."""
        c, first_line = self.config, True
        while self.step < c.max_steps:
            started = time.perf_counter()
            micro_batches = self.sample()
            rollout_time = time.perf_counter() - started
            metrics = self.train_step(micro_batches)
            metrics["time/rollout"] = rollout_time
            metrics["tokens_per_s"] = metrics.pop("_tokens") / (time.perf_counter() - started)
            metrics.update(rollout_metrics(micro_batches, self.tokenizer, self.reduce_sum))
            alarm = self.guard.update(metrics) if c.collapse_action != "off" else None
            metrics["collapse_alarm"] = int(alarm is not None)
            metrics["data/skipped_records"] = self.preflight_skipped + self._sum(len(self.skipped_records) - self.preflight_skipped)
            if first_line:  # how this run computes, on the first line it logs (also in run.json)
                metrics.update(self._backend_metrics())
                first_line = False
            self._log(metrics)
            if alarm is not None:
                self._on_collapse(alarm)
            bar.update(1)
            bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("loss", *(f"frac/{r}" for r in REGIME_NAMES)) if k in metrics})
            # Every process must stop at the same step: one signalled process stops them all.
            stopping = self._sum(float(stop.received is not None)) > 0
            if self.step % c.save_steps == 0 or self.step == c.max_steps or stopping:
                self.save()
            if stopping and self.step < c.max_steps:
                bar.close()
                raise Preempted(f"stopped by a signal after step {self.step} of {c.max_steps}: checkpoint-{self.step} written in "
                                f"{self.output_dir}; continue with `dopd train ... --resume`")

    def sample(self) -> list[MicroBatch]:
        """This process's micro-batches of the current step, with rollouts seeded by (seed, step, process)."""
        self._seed_step()
        return [self.rollout(indices) for indices in self._step_prompt_indices()]

    def rollout(self, record_indices: list[int]) -> MicroBatch:
        """Sample `num_generations` responses per record from the student on the plain view."""
        records = [self._present_record(i) for i in record_indices]
        try:
            rollout = self._sample(records)
        except DopdError:
            raise
        except Exception as err:  # noqa: BLE001 - `auto` falls back from a failed compile; anything else raises again, eagerly
            if not (self.config.rollout.generation == "auto" and self.rollout_config.generation == "compiled"):
                raise
            self.generation_error = f"{type(err).__name__}: {err}"[:500]
            logger.warning("rollout.generation auto: compiled generation failed (%s); this run generates eagerly", self.generation_error)
            self.rollout_config = dataclasses.replace(self.rollout_config, generation="eager")
            self._write_run_info()
            rollout = self._sample(records)
        return MicroBatch(records, rollout)

    def _sample(self, records: list[dict]):
        """The student's responses; a sharded student is gathered whole once for the rollout (§4.6)."""
        def sample(model: nn.Module):
            return sample_responses(model, self.adapters["student"], records, self.rollout_config, self.eos_token_ids, self.suppress_ids)
        return generate_with_full_weights(self.loss_module, sample) if self.sharded else sample(self.student)

    def train_step(self, micro_batches: list[MicroBatch], update: bool = True) -> dict:
        """One optimizer step on this process's rollouts (docs/design.md §4), in the method's order:
        score the views -> step statistics -> each micro-batch's share of the loss and its backward ->
        update -> metrics. `update=False` stops with the step's gradients in `.grad`."""
        t0 = time.perf_counter()
        scored = [self.score(mb) for mb in micro_batches]  # §4.2: the target views, without gradient
        t1 = time.perf_counter()
        stats = self.step_statistics(scored)  # §4.3: thresholds over every token of the step, all processes
        masks = [s.student_view.response_mask for s in scored]
        totals = (self._sum(sum(int(m.any(-1).sum()) for m in masks)), self._sum(sum(int(m.sum()) for m in masks)))  # §1.6
        self.loss_module.train()
        shares = [self.backward_share(s, stats, totals, last=i == len(scored) - 1) for i, s in enumerate(scored)]  # §4.4
        for frozen in self._frozen_scorers():
            release(frozen)  # FSDP: the frozen models' output embeddings, gathered for the step, are sharded again
        t2 = time.perf_counter()
        metrics = {"step": self.step + 1, "loss": self._sum(sum(share.loss for share in shares))}
        if update:
            metrics.update(self.apply_update(metrics["loss"]))  # clip, AdamW, EMA; a non-finite step is skipped
        metrics.update(self.step_metrics(scored, shares, stats))  # §4.5
        metrics.update({"time/scoring": t1 - t0, "time/loss": t2 - t1, "_tokens": totals[1]})
        return metrics

    def backward_share(self, s: _Scored, step_stats: dict[str, float], totals: tuple[float, float], last: bool) -> _Share:
        """Route a micro-batch's tokens, weight them by the step's totals (§1.6) and backpropagate
        its share of the step's loss; gradients are synchronised across processes at the last one."""
        stats = self.statistics_for(s, step_stats)
        mask = s.student_view.response_mask
        route = self.routes(s, stats)
        route_bt = torch.full(mask.shape, -1, dtype=torch.long, device=self.device).masked_scatter(mask, route)
        weight = self.objective.token_weights(mask, route_bt, stats, s.signals, s.groups, *totals)[mask]
        # DDP all-reduces at the last micro-batch; FSDP reduce-scatters each (no unsharded gradients kept).
        with self.accelerator.no_sync(self.loss_module) if not (last or self.sharded) else contextlib.nullcontext():
            loss, token_loss, entropy = self.loss_module(
                student_loss, s.student_view.inputs, s.student_view.response_positions, mask, route, weight,
                s.targets, self.objective, self.vocab_size, self.loss_chunk_size, self.loss_backend,
            )
            # DDP / FSDP average gradients over processes; the shares must add up instead.
            self.accelerator.backward(loss * self.accelerator.num_processes)
        routed_by_regime = s.signals is not None and s.signals.advantage_gap is not None
        return _Share(float(loss.detach().double()), token_loss, entropy, assign_regimes(s.signals, stats) if routed_by_regime else None, route)

    def apply_update(self, loss: float) -> dict:
        """Clip and step, unless the loss or the gradient is not finite (then the step is skipped)."""
        c = self.config
        max_norm = c.optim.max_grad_norm if c.optim.max_grad_norm > 0 else math.inf
        if self.sharded:  # DTensor gradients: torch's clip takes them; the norm is reduced over the shards
            norm = torch.nn.utils.clip_grad_norm_([p for p in self.student.parameters() if p.requires_grad], max_norm)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        else:
            grad_norm = float(self.accelerator.clip_grad_norm_(self.loss_module.parameters(), max_norm))
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.optimizer.step()
            self.scheduler.step()
            self._update_ema()
            self.consecutive_skips = 0
        else:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            logger.warning("step %d: non-finite loss (%s) or gradient norm (%s); update skipped", self.step + 1, loss, grad_norm)
            if self.consecutive_skips > c.max_consecutive_skips:
                raise TrainingError(f"{self.consecutive_skips} non-finite steps in a row (limit max_consecutive_skips={c.max_consecutive_skips}); lower optim.lr or check the data")
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm, "skipped_steps": self.skipped_steps}

    def score(self, mb: MicroBatch) -> _Scored:
        """Build the views the objective needs and score the target views without gradient."""
        responses = mb.rollout.responses
        records = [mb.records[i] for i in mb.rollout.record_index]
        views = build_views(self.adapters, ("student", *self.scored_views), records, responses)
        views = {k: v.to(self.device) for k, v in views.items()}
        targets = self._score_targets(views)
        signals = self.objective.token_signals({v: t.token_logprob for v, t in targets.items()}, {v: t.entropy for v, t in targets.items()})
        prune_keys = None
        if signals is not None:
            if self.objective.router == "prune":
                generator = torch.Generator().manual_seed(self.config.objective.prune_seed * 1_000_003 + self.step)
                prune_keys = self.objective.prune_keys(signals, generator)
        groups = torch.as_tensor(mb.rollout.record_index, dtype=torch.long, device=self.device)
        return _Scored(views["student"], targets, signals, prune_keys, groups)

    def _on_collapse(self, alarm: CollapseAlarm) -> None:
        """Warn once with what was seen and what avoids it; with `collapse_action: stop`, save and stop."""
        c = self.config
        advice = [f"a lower optim.lr (now {c.optim.lr:g})"]
        to_self = any(r is not None and r.target == "student_priv" for r in self.objective.routes)
        if to_self and c.objective.privileged_student == "live":
            advice.insert(0, "objective.privileged_student=initial (or ema): routes to the live privileged student are "
                             "self-distillation toward a moving copy, which can reach a trivial agreement")
        message = f"collapse guard ({self.objective.name}): {alarm.describe()}. Settings that avoid it: {'; '.join(advice)}."
        if c.collapse_action == "stop":
            self.save()
            raise CollapseDetected(f"{message} Stopped after saving checkpoint-{self.step} in {self.output_dir}.")
        logger.warning("%s Training goes on (collapse_action=stop would end the run here).", message)

    # ----------------------------------------------------------------------------- components
    def _score_targets(self, views: dict[str, ViewBatch]) -> dict[str, TargetStates]:
        student = self._scoring_model("student_priv")
        was_training = self.student.training
        self.student.eval()
        scored = {k: v for k, v in views.items() if k != "reference"}
        # Log-probs and entropies cost a pass over [tokens, V]: only for the views something reads
        # them from (signals, sampled routes, the teacher's entropy metric, the diagnostics).
        entropy_views = {"teacher_priv", *self.objective.entropy_views}
        logprob_views = {*self.objective.logprob_views, *(DIAGNOSTIC_VIEWS if self.config.diagnostics else ())}
        with self._base_weights() if self.config.objective.privileged_student == "initial" and self.config.lora.enabled else contextlib.nullcontext():
            targets = score_views(scored, self.teacher, student, self.vocab_size, entropy_views=entropy_views, logprob_views=logprob_views)
        if "reference" in views:  # the initial student: a frozen copy, or the base weights under LoRA
            with self._base_weights() if self.reference_model is None else contextlib.nullcontext():
                targets.update(score_views({"reference": views["reference"]}, None, None, self.vocab_size, reference=self._scoring_model("reference"),
                                           entropy_views=entropy_views, logprob_views=logprob_views))
        self.student.train(was_training)
        return targets

    def _scoring_model(self, view: str) -> nn.Module:
        """The model that scores a view (for its output embedding): the teacher, the privileged
        student or the reference, each defaulting to the student itself."""
        if view in TEACHER_VIEWS:
            return self.teacher
        if view == "reference":
            return self.reference_model or self._live_student()
        return self.privileged_student or self._live_student()

    def _frozen_scorers(self) -> list[nn.Module]:
        """The frozen models that score this run's views (each once), not the live student."""
        used = {id(m): m for m in (self._scoring_model(v) for v in self.scored_views) if m is not None and m is not self._live_student()}
        return list(used.values())

    def _live_student(self) -> nn.Module:
        """The student as a scorer calls it: under FSDP through its root wrapper (dopd_vl/parallel.py)."""
        return self.loss_module if self.sharded else self.student

    def _shard(self, wrapper: ModelCall) -> ModelCall:
        return shard_model(wrapper, next(wrapper.parameters()).dtype, self.device)

    # ---------------------------------------------------------------------------------- data
    def _present_record(self, index: int) -> dict:
        """Record `index`, or under `skip` the next one whose image files are still all there."""
        record, found = self.picker.pick(index, self.step + 1)
        if found:
            self.skipped_records += found
            self._write_skipped()
        return record

    def _write_skipped(self) -> None:
        """output_dir/skipped.jsonl: every record this process left out, and why."""
        if self.skipped_records and self.output_dir.is_dir():
            name = "skipped.jsonl" if self.accelerator.is_main_process else f"skipped.rank{self.accelerator.process_index}.jsonl"
            (self.output_dir / name).write_text("".join(json.dumps(r) + "\n" for r in self.skipped_records), encoding="utf-8")

    def run_info(self) -> dict:
        """What this run used where a setting left the choice open: written to output_dir/run.json."""
        import transformers

        from dopd_vl import __version__

        check = self.backend_check.to_dict() if self.backend_check is not None else None
        return {
            "versions": {"dopd_vl": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
            "device": str(self.device), "processes": self.accelerator.num_processes,
            "loss_backend": {"requested": self.config.loss_backend, "used": self.loss_backend, "self_check": check},
            "loss_chunk_size": self.loss_chunk_size,
            "rollout_generation": {"requested": self.config.rollout.generation, "used": self.rollout_config.generation, "fallback_reason": self.generation_error},
            "data": {"train": self.config.data.train, "train_records": len(self.records), "preflight": self.config.data.preflight,
                     "skipped_records": self.preflight_skipped},
        }

    def _backend_metrics(self) -> dict:
        check = self.backend_check
        return {"loss_backend/triton": float(self.loss_backend == "triton"), "rollout/compiled": float(self.rollout_config.generation == "compiled"),
                **({"loss_backend/self_check_passed": float(check.passed)} if check else {}),
                **({"loss_backend/self_check_rel_error": check.max_rel_error} if check and check.max_rel_error is not None else {})}

    def _write_run_info(self) -> None:
        """run.json and the recipe as trained (config.yaml), which `dopd export` puts in the card."""
        if self.accelerator.is_main_process and self.output_dir.is_dir():
            (self.output_dir / "run.json").write_text(json.dumps(self.run_info(), indent=2) + "\n", encoding="utf-8")
            (self.output_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(self.config), sort_keys=False), encoding="utf-8")
        self._write_skipped()

    def _base_weights(self):
        """The student's initial weights under LoRA: the adapter switched off [ours]."""
        return self.student.disable_adapter()

    def _make_reference_model(self) -> nn.Module | None:
        """ExOPD's reference, the initial student: shared with a frozen initial privileged student,
        a frozen copy otherwise, or None under LoRA (the adapter is switched off instead)."""
        if "reference" not in self.objective.views or self.config.lora.enabled:
            return None
        if self.config.objective.privileged_student == "initial" and self.privileged_student is not None:
            return self.privileged_student
        return copy.deepcopy(self.student).eval().requires_grad_(False)

    def _make_privileged_student(self) -> nn.Module | None:
        mode = self.config.objective.privileged_student
        if mode == "live" or (mode == "initial" and self.config.lora.enabled):
            return None  # the live student (detached), or the adapter switched off
        frozen = copy.deepcopy(self.student).eval().requires_grad_(False)
        return frozen  # "initial": the starting weights; "ema": updated after every step

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.config.objective.privileged_student != "ema":
            return
        decay = self.config.objective.ema_decay
        for ema_p, p in zip(self.privileged_student.parameters(), self.student.parameters()):
            ema_p.lerp_(p.detach().to(ema_p.dtype), 1.0 - decay)

    def statistics_for(self, s: _Scored, step_stats: dict[str, float]) -> dict[str, float]:
        """The statistics a micro-batch is routed with: the step's, or its own (`threshold_scope: local`)."""
        return step_stats if self.config.objective.threshold_scope == "global" else self.objective.step_statistics(s.signals, s.prune_keys)

    def routes(self, s: _Scored, stats: dict[str, float]) -> Tensor:
        """The route index of each valid token of a scored micro-batch, flattened ([N]; -1: no loss)."""
        valid = torch.ones(int(s.student_view.response_mask.sum()), dtype=torch.bool, device=self.device)
        return self.objective.assign_routes(valid, s.signals, stats, s.prune_keys)

    def step_statistics(self, scored: list[_Scored]) -> dict[str, float]:
        """Thresholds and counts over every valid token of the step, on every process (§1.3)."""
        if not self.objective.needs_signals and self.objective.router != "prune":
            return {}
        parts = [s.signals for s in scored]
        gathered = parts[0].map(lambda name, _: self.gather(torch.cat([getattr(p, name) for p in parts]))) if parts[0] is not None else None
        keys = self.gather(torch.cat([s.prune_keys for s in scored])) if self.objective.router == "prune" else None
        return self.objective.step_statistics(gathered, keys)

    def step_metrics(self, scored: list[_Scored], shares: list[_Share], stats: dict[str, float]) -> dict:
        """Thresholds, regime fractions, per-regime loss and A, entropies (and with `diagnostics`,
        the diag/* figures, §1.11): over the step's tokens, all processes (§4.5)."""
        metrics = {f"threshold/{k}": v for k, v in stats.items() if k in ("A", "q_student", "q_teacher", "teacher_entropy", "visual_advantage")}
        token_loss = self.gather(torch.cat([share.token_loss for share in shares]).double())
        metrics["entropy/student"] = self.gather(torch.cat([share.entropy for share in shares]).double()).mean().item()
        if "teacher_priv" in scored[0].targets:
            metrics["entropy/teacher_priv"] = self.gather(torch.cat([s.targets["teacher_priv"].entropy for s in scored]).double()).mean().item()
        if shares[0].regime is not None:
            regime = self.gather(torch.cat([share.regime for share in shares]).double())
            gap = self.gather(torch.cat([s.signals.advantage_gap for s in scored]).double())
            for code, name in enumerate(REGIME_NAMES):
                sel = regime == code
                count = int(sel.sum())
                metrics[f"frac/{name}"] = count / max(regime.numel(), 1)
                metrics[f"loss/{name}"] = token_loss[sel].mean().item() if count else 0.0
                metrics[f"A/{name}"] = gap[sel].mean().item() if count else 0.0
        elif self.objective.router == "split":  # EOPD / VA-OPD: the share of tokens at or above the split threshold
            route = self.gather(torch.cat([share.route for share in shares]).double())
            metrics[f"frac/high_{self.objective.split_on}"] = (route == 1).double().mean().item()
        if self.config.diagnostics:  # what DOPD's routing would see on this step, whatever the objective
            logprob = {v: self.gather(torch.cat([s.targets[v].token_logprob for s in scored]).double()) for v in DIAGNOSTIC_VIEWS}
            per_token, _ = token_diagnostics(logprob, self.config.objective.outlier_fraction)
            metrics.update({f"diag/{k}": v for k, v in summarise_diagnostics(per_token).items()})
        return metrics

    def _step_prompt_indices(self) -> list[list[int]]:
        """This process's micro-batches of record indices for the current step (seeded epochs)."""
        c = self.config
        per_micro, processes = c.optim.batch_size, self.accelerator.num_processes
        per_step = per_micro * c.optim.gradient_accumulation_steps * processes
        start = self.step * per_step
        stream = []
        epoch = start // len(self.records)
        while len(stream) < (start % len(self.records)) + per_step:
            order = list(range(len(self.records)))
            random.Random(c.seed * 7919 + epoch).shuffle(order)
            stream += order
            epoch += 1
        window = stream[start % len(self.records) : start % len(self.records) + per_step]
        p = self.accelerator.process_index
        return [window[(m * processes + p) * per_micro : (m * processes + p + 1) * per_micro] for m in range(c.optim.gradient_accumulation_steps)]

    def _seed_step(self) -> None:
        """Rollout sampling depends only on (seed, step, process): resumed runs sample the same."""
        seed = (self.config.seed * 1_000_003 + self.step * 101 + self.accelerator.process_index) % (2**63)
        torch.manual_seed(seed)
        random.seed(seed)

    def gather(self, values: Tensor) -> Tensor:
        """Concatenate a variable-length 1-D tensor over processes (exact, no sampling)."""
        if self.accelerator.num_processes == 1:
            return values
        values = values.to(self.device)
        lengths = self.accelerator.gather(torch.tensor([values.numel()], device=self.device))
        padded = self.accelerator.pad_across_processes(values, dim=0)
        rows = self.accelerator.gather(padded[None]).reshape(len(lengths), -1)
        return torch.cat([row[: int(n)] for row, n in zip(rows, lengths)])

    def reduce_sum(self, values: Tensor) -> Tensor:
        """Element-wise sum of a tensor over processes."""
        values = values.to(self.device)
        return self.accelerator.reduce(values, "sum") if self.accelerator.num_processes > 1 else values

    def _sum(self, value) -> float:
        t = torch.as_tensor(value, dtype=torch.float64, device=self.device)
        return float(self.accelerator.reduce(t, "sum")) if self.accelerator.num_processes > 1 else float(t)

    # --------------------------------------------------------------------- logging and saving
    def _log(self, metrics: dict) -> None:
        if self.config.report_to:
            self.accelerator.log(metrics, step=self.step)
        if self.accelerator.is_main_process:
            with open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(metrics) + "\n")

    def save(self) -> None:
        """checkpoint-N from the main process (under FSDP every process writes its shards first);
        a failed write (a full disk) stops every process."""
        self.accelerator.wait_for_everyone()
        failure = None
        if self.sharded and self._sum(float((failure := self._save_shards()) is not None)) > 0:  # every process's shards, or none
            if self.accelerator.is_main_process:
                shutil.rmtree(self.output_dir / f".tmp-checkpoint-{self.step}", ignore_errors=True)
            raise failure or CheckpointError(f"a process could not write its shards of checkpoint-{self.step} (its message says why)")
        if self.accelerator.is_main_process:
            ema = self.config.objective.privileged_student == "ema"
            extra = {f"ema.{k}": v for k, v in self.privileged_student.state_dict().items()} if ema and not self.sharded else None
            try:
                save_checkpoint(
                    self.output_dir, self.step, model=self.student if self.sharded else self.accelerator.unwrap_model(self.loss_module).model,
                    processing=self.student_processing, optimizer=self.optimizer, scheduler=self.scheduler,
                    state={"skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips, "guard": self.guard.state_dict(),
                           "processes": self.accelerator.num_processes, "parallel": self.config.parallel},
                    config=config_to_dict(self.config), extra_tensors=extra, keep=self.config.save_total_limit, sharded=self.sharded,
                )
            except CheckpointError as err:
                failure = err
        if self._sum(float(failure is not None)) > 0:  # also a barrier: the other processes learn of the failure
            raise failure or CheckpointError(f"a process could not write checkpoint-{self.step} (its message says why)")

    def _save_shards(self) -> CheckpointError | None:
        """Every process's shards into `.tmp-checkpoint-N/sharded` (§4.6); the failure, if any."""
        from torch.distributed.checkpoint.api import CheckpointException

        if self.accelerator.is_main_process:
            new_checkpoint_folder(self.output_dir, self.step)
        self.accelerator.wait_for_everyone()
        tmp = self.output_dir / f".tmp-checkpoint-{self.step}"
        try:
            save_sharded_state(tmp, self.student, self.optimizer, self._sharded_frozen(), main=self.accelerator.is_main_process)
            return None
        except (Exception, CheckpointException) as err:  # a full disk, a failing filesystem; DCP wraps them in its own exception
            return CheckpointError(f"writing the shards of checkpoint-{self.step} into {tmp} failed: {str(err)[:500]}")

    def _sharded_frozen(self) -> dict[str, nn.Module]:
        """Sharded state a checkpoint keeps besides the student: the EMA privileged student."""
        return {"ema": self.privileged_student.model} if self.config.objective.privileged_student == "ema" else {}

    def export_final(self) -> Path:
        """The trained student as a plain model folder (LoRA merged), loadable with from_pretrained."""
        final = self.output_dir / "final"
        self.accelerator.wait_for_everyone()
        weights = full_state_dict(self.student) if self.sharded else None  # FSDP: gathered onto the main process
        if self.accelerator.is_main_process:
            model = self.student if self.sharded else self.accelerator.unwrap_model(self.loss_module).model
            if self.config.lora.enabled:
                model = copy.deepcopy(model).merge_and_unload()
            save_model_folder(model, self.student_processing, final, state_dict=weights)
        self.accelerator.wait_for_everyone()
        return final

    def _resume(self) -> None:
        checkpoint = latest_checkpoint(self.output_dir)
        if checkpoint is None:
            logger.warning("--resume: no checkpoint in %s; starting from step 0", self.output_dir)
            return
        state = json.loads((checkpoint / "state.json").read_text())
        if self.sharded != (checkpoint / "sharded").is_dir():
            raise CheckpointError(f"{checkpoint} was written with parallel: {state.get('parallel', 'ddp')}; resume it with the same setting")
        if self.sharded:
            if state.get("processes") != self.accelerator.num_processes:
                logger.warning("%s was written by %s processes, this run has %d: the shards are re-cut as they load, but the "
                               "steps that follow split their data differently from a run that kept %s", checkpoint,
                               state.get("processes"), self.accelerator.num_processes, state.get("processes"))
            load_sharded_state(checkpoint, self.student, self.optimizer, self._sharded_frozen())
        else:
            load_student_weights(self.accelerator.unwrap_model(self.loss_module).model, checkpoint, lora=self.config.lora.enabled)
        state, extra = load_checkpoint_state(checkpoint, None if self.sharded else self.optimizer, self.scheduler)
        if extra:
            self.privileged_student.load_state_dict({k.removeprefix("ema."): v for k, v in extra.items()})
        self.step, self.skipped_steps, self.consecutive_skips = state["step"], state["skipped_steps"], state["consecutive_skips"]
        self.guard.load_state_dict(state.get("guard", {}))
        metrics = self.output_dir / "metrics.jsonl"
        if self.accelerator.is_main_process and metrics.exists():  # drop lines logged after the checkpoint
            kept = [line for line in metrics.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= self.step]
            metrics.write_text("".join(line + "\n" for line in kept))
        logger.info("resumed from %s at step %d", checkpoint, self.step)


# ---------------------------------------------------------------------------------- helpers
def _check_image_context(records, source: str) -> None:
    """vision_opd needs an image (e.g. the `crop` format's evidence crop) in the privileged context."""
    record = records[0]
    context = record.get("privileged_context")
    if not (isinstance(context, list) and any(part.get("type") == "image" for part in context)):
        raise DatasetError("objective vision_opd needs an image in the privileged context; build the data with "
                           "`dopd build grounding ... --privileged-format crop`", file=source, record=record.get("id", "?"), field="privileged_context")
