"""The models of a run (docs/design.md §4, §4.6) and the scorer table: which model scores each view.

`setup_models` loads the student (trained), the teacher (frozen, in its own dtype, never in the
optimizer), the privileged student and the reference (frozen copies where the recipe asks for
them), each sharded under `parallel: fsdp`. `RunModels` holds them and is where the FSDP / LoRA /
EMA differences live, so the step never asks whether a model is sharded or adapted.

The scorer table (`RunModels.scorers`) is the one place that says which model, and in which
weights context (under LoRA the base weights, the adapter switched off), scores each view. Every
entry implements the `ViewScorer` protocol; scoring calls only that, so a remote teacher (a served
model returning the same states) plugs in as one more scorer.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from dopd_vl.errors import ConfigError
from dopd_vl.loss.chunked import TargetStates, target_states
from dopd_vl.method.objectives import Objective
from dopd_vl.method.views import TEACHER_VIEWS
from dopd_vl.modality.batches import ViewBatch, valid_response_states
from dopd_vl.models.loading import (
    check_same_tokenizer,
    eos_token_ids,
    load_model,
    load_processing,
    never_sampled_token_ids,
    output_embedding_weight,
    resolve_dtype,
    tokenizer_of,
    with_lora,
)
from dopd_vl.models.parallel import (
    ModelCall,
    call_model,
    full_tensor,
    generate_with_full_weights,
    is_sharded,
    release,
    shard_model,
)
from dopd_vl.training.config import TrainConfig

logger = logging.getLogger(__name__)

__all__ = ["ViewScorer", "ModelScorer", "RunModels", "setup_models", "scorer_table"]


@runtime_checkable
class ViewScorer(Protocol):
    """Scores one view of a micro-batch without gradient (docs/design.md §4.2)."""

    def score(
        self, batch: ViewBatch, vocab_size: int, chunk_size: int, with_entropy: bool, with_logprob: bool
    ) -> TargetStates:
        """The view's final hidden states at the valid response tokens and the output embedding
        (`TargetStates`), with the sampled tokens' log-probs and entropies where asked."""
        ...


@dataclass(frozen=True)
class ModelScorer:
    """A local model scores the view: its forward (through its FSDP wrapper when sharded) inside
    `weights()`, the context that selects its weights (LoRA's base weights, or as they are)."""

    model: nn.Module
    weights: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    @torch.no_grad()
    def score(
        self, batch: ViewBatch, vocab_size: int, chunk_size: int, with_entropy: bool, with_logprob: bool
    ) -> TargetStates:
        with self.weights():
            hidden, ids, head = call_model(
                self.model, lambda m: (*valid_response_states(m, batch), output_embedding_weight(m))
            )
            return target_states(hidden, head, ids, vocab_size, chunk_size, with_entropy, with_logprob)


@dataclass
class RunModels:
    """The models of a run and who scores which view."""

    student: nn.Module  # the trained model (a peft model under LoRA); its parameters are the optimizer's
    student_call: nn.Module  # every use of the student goes through it: a (sharded or DDP) ModelCall
    teacher: nn.Module | None
    privileged_student: nn.Module | None  # a frozen `initial` copy or the `ema`; None: the live student
    reference: nn.Module | None  # ExOPD's initial student; None: the privileged copy or the base weights
    processing: object  # the student's tokenizer or processor
    teacher_processing: object
    vocab_size: int
    eos_token_ids: list[int]
    suppress_ids: list[int]
    lora: bool
    privileged_mode: str  # objective.privileged_student: live | initial | ema
    sharded: bool
    scorers: dict[str, ViewScorer] = field(default_factory=dict)  # view -> its scorer (`scorer_table`)

    @property
    def tokenizer(self):
        return tokenizer_of(self.processing)

    @property
    def live_student(self) -> nn.Module:
        """The student as a scorer calls it: under FSDP through its root wrapper (models/parallel.py)."""
        return self.student_call if self.sharded else self.student

    def scorer(self, view: str) -> nn.Module | None:
        """The local model that scores a view (None: no model loaded for it), from the scorer table."""
        entry = self.scorers.get(view)
        return entry.model if isinstance(entry, ModelScorer) else None

    def frozen_scorers(self, views) -> list[nn.Module]:
        """The frozen models that score `views` (each once), not the live student."""
        used = {id(m): m for m in map(self.scorer, views) if m is not None and m is not self.live_student}
        return list(used.values())

    def release(self, views) -> None:
        """FSDP: the frozen scorers' output embeddings, gathered for the step, are sharded again."""
        for model in self.frozen_scorers(views):
            release(model)

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        if self.privileged_mode != "ema":
            return
        for ema_p, p in zip(self.privileged_student.parameters(), self.student.parameters()):
            ema_p.lerp_(p.detach().to(ema_p.dtype), 1.0 - decay)

    def with_full_student(self, fn):
        """`fn(student)` for a rollout: a sharded student is gathered whole once for it (§4.6)."""
        return generate_with_full_weights(self.student_call, fn) if self.sharded else fn(self.student)

    def gradient_sync(self, accelerator, last: bool):
        """DDP all-reduces at the last micro-batch only; FSDP reduce-scatters each (no unsharded gradients kept)."""
        if last or self.sharded:
            return contextlib.nullcontext()
        return accelerator.no_sync(self.student_call)

    def clip_grad_norm(self, accelerator, max_norm: float) -> float:
        """Clip the student's gradient; the norm before clipping (over every shard under FSDP)."""
        if self.sharded:  # DTensor gradients: torch's clip takes them; the norm is reduced over the shards
            norm = torch.nn.utils.clip_grad_norm_([p for p in self.student.parameters() if p.requires_grad], max_norm)
            return float(full_tensor(norm))
        return float(accelerator.clip_grad_norm_(self.student_call.parameters(), max_norm))

    def with_full_teacher(self, fn):
        """`fn(teacher)` for generation: a sharded teacher is gathered whole once for it."""
        return generate_with_full_weights(self.teacher, fn) if is_sharded(self.teacher) else fn(self.teacher)

    def sharded_frozen(self) -> dict[str, nn.Module]:
        """Sharded state a checkpoint keeps besides the student: the EMA privileged student."""
        return {"ema": self.privileged_student.model} if self.sharded and self.privileged_mode == "ema" else {}


def setup_models(
    c: TrainConfig, objective: Objective, scored_views: tuple[str, ...], device: torch.device
) -> RunModels:
    """Load (and under `parallel: fsdp` shard) the run's models. Objectives without a teacher view
    (self_distill, vision_opd) do not load the teacher's weights."""
    student = load_model(c.student.name_or_path, resolve_dtype(c.student.dtype, device), c.student.trust_remote_code)
    processing = load_processing(c.student.name_or_path, c.student.trust_remote_code)
    teacher_processing = processing
    if c.teacher.name_or_path:
        teacher_processing = load_processing(c.teacher.name_or_path, c.teacher.trust_remote_code)
    teacher = None
    if TEACHER_VIEWS & set(scored_views):
        if not c.teacher.name_or_path:
            needs = (
                f"objective {objective.name!r}"
                if TEACHER_VIEWS & set(objective.views)
                else "diagnostics (dopd diagnose)"
            )
            raise ConfigError(
                f"{needs} scores teacher views {sorted(TEACHER_VIEWS & set(scored_views))}: set teacher.name_or_path"
            )
        dtype = resolve_dtype(c.teacher.dtype, device)
        teacher = load_model(c.teacher.name_or_path, dtype, c.teacher.trust_remote_code).eval().requires_grad_(False)
    elif c.teacher.name_or_path:
        logger.info("objective %s uses no teacher view: the teacher's weights are not loaded", objective.name)
    vocab_size = check_same_tokenizer(processing, teacher_processing, student, teacher)
    if c.gradient_checkpointing:  # transformers 5 renamed it (the old name warns of removal in v6)
        getattr(student, "activation_checkpointing_enable", student.gradient_checkpointing_enable)()
    if c.lora.enabled:
        student = with_lora(student, c.lora)
    mode = c.objective.privileged_student
    # "initial": the starting weights; "ema": updated after every step; live (or initial under LoRA): none.
    frozen_copy = mode == "ema" or (mode == "initial" and not c.lora.enabled)
    privileged = copy.deepcopy(student).eval().requires_grad_(False) if frozen_copy else None
    reference = None  # ExOPD's initial student: shared with a frozen initial copy, else its own (none under LoRA)
    if "reference" in objective.views and not c.lora.enabled:
        reference = privileged if mode == "initial" else copy.deepcopy(student).eval().requires_grad_(False)
    models = RunModels(
        student=student,
        student_call=ModelCall(student),
        teacher=teacher,
        privileged_student=privileged,
        reference=reference,
        processing=processing,
        teacher_processing=teacher_processing,
        vocab_size=vocab_size,
        eos_token_ids=eos_token_ids(processing, student),
        suppress_ids=never_sampled_token_ids(processing, student),
        lora=c.lora.enabled,
        privileged_mode=mode,
        sharded=c.parallel == "fsdp",
    )
    if models.sharded:
        _shard(models, c, device)
    for model in {
        id(m): m for m in (models.teacher, models.privileged_student, models.reference) if m is not None
    }.values():
        if not is_sharded(model):
            model.to(device)
    models.scorers = scorer_table(models)
    return models


def _shard(models: RunModels, c: TrainConfig, device: torch.device) -> None:
    """§4.6: ours, not accelerate's: every model behind a wrapper whose forward FSDP hooks."""
    if not torch.distributed.is_initialized():  # one process: FSDP still needs a group (of one)
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)

    def shard(wrapper: ModelCall) -> ModelCall:
        return shard_model(wrapper, next(wrapper.parameters()).dtype, device)

    models.student_call = shard(models.student_call)
    if models.teacher is not None and c.teacher.shard is not False:
        models.teacher = shard(ModelCall(models.teacher))
    frozen = {id(m): m for m in (models.privileged_student, models.reference) if m is not None}
    wrapped = {key: shard(ModelCall(m)) for key, m in frozen.items()}
    models.privileged_student = wrapped.get(id(models.privileged_student))
    models.reference = wrapped.get(id(models.reference))


def scorer_table(models: RunModels) -> dict[str, ViewScorer]:
    """Which model scores each view, in which weights (docs/design.md §4.2): `student` (the sampling
    policy's log-probs, uni_opd's l_old) by the live student without gradient; the teacher views by the
    teacher; `student_priv` by the privileged student (a frozen `initial` copy or the EMA; the live
    student, stop-grad, when `live`; under LoRA `initial` the base weights, adapter off); `reference`
    (ExOPD's initial student) by its frozen copy, or under LoRA the base weights [ours]."""
    live = models.live_student
    base = models.student.disable_adapter if models.lora else contextlib.nullcontext
    table: dict[str, ViewScorer] = {"student": ModelScorer(live)}  # the sampling policy, no gradient (uni_opd's l_old)
    if models.teacher is not None:
        table["teacher_priv"] = table["teacher_plain"] = ModelScorer(models.teacher)
    initial_base = models.lora and models.privileged_mode == "initial"
    table["student_priv"] = ModelScorer(
        models.privileged_student or live, base if initial_base else contextlib.nullcontext
    )
    table["reference"] = ModelScorer(
        models.reference or live, base if models.reference is None else contextlib.nullcontext
    )
    return table
