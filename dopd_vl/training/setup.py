"""What a run is made of before its first step (docs/design.md §4), in three named steps:

* `setup_models`: the student (trained), the teacher (frozen, in its own dtype, never in the
  optimizer), the privileged student and the reference (frozen copies where the recipe asks for
  them), each sharded under `parallel: fsdp` (§4.6);
* `setup_data`: the adapters, the preflight of every record (§3.1), the mid-run record picker;
* `setup_optimizer`: AdamW with the cosine schedule, and DDP through accelerate (`parallel: ddp`);
* `setup_loss_backend`: the loss backend (the Triton kernels' self-check, §2), chunking and generation;
* `setup_rollout_engine`: what samples the rollouts (Hugging Face `generate` or a colocated vLLM, §4.1).

`RunModels` then answers which model scores each view, so the trainer never asks whether a model
is sharded.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dopd_vl.data.image_roots import image_roots
from dopd_vl.data.records import records_root
from dopd_vl.data.training_records import RecordPicker, preflight_records
from dopd_vl.errors import ConfigError, DatasetError
from dopd_vl.loss.chunked import auto_chunk_size
from dopd_vl.loss.kernels import resolve_loss_backend
from dopd_vl.loss.selfcheck import checked_triton_backend
from dopd_vl.method.objectives import Objective
from dopd_vl.method.views import PRIVILEGED_VIEWS, TEACHER_VIEWS
from dopd_vl.modality.adapters import make_adapter
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
    generate_with_full_weights,
    is_sharded,
    release,
    shard_model,
    sum_over_processes,
)
from dopd_vl.models.tiny import resolve_model_path
from dopd_vl.training.config import TrainConfig
from dopd_vl.training.engines import HFEngine, VllmEngine
from dopd_vl.training.rollout import resolve_generation
from dopd_vl.training.run_info import RunBackends

logger = logging.getLogger(__name__)

__all__ = ["RunModels", "TrainingData", "setup_models", "setup_data", "setup_optimizer", "setup_loss_backend"]


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

    @property
    def tokenizer(self):
        return tokenizer_of(self.processing)

    @property
    def live_student(self) -> nn.Module:
        """The student as a scorer calls it: under FSDP through its root wrapper (models/parallel.py)."""
        return self.student_call if self.sharded else self.student

    def scorer(self, view: str) -> nn.Module:
        """The model that scores a view: the teacher, the privileged student or the reference, the
        last two defaulting to the live student."""
        if view in TEACHER_VIEWS:
            return self.teacher
        if view == "reference":
            return self.reference or self.live_student
        return self.privileged_student or self.live_student

    def frozen_scorers(self, views) -> list[nn.Module]:
        """The frozen models that score `views` (each once), not the live student."""
        used = {id(m): m for m in map(self.scorer, views) if m is not None and m is not self.live_student}
        return list(used.values())

    def release(self, views) -> None:
        """FSDP: the frozen scorers' output embeddings, gathered for the step, are sharded again."""
        for model in self.frozen_scorers(views):
            release(model)

    def base_weights(self, view: str):
        """The context in which `view` is scored: under LoRA the initial privileged student and the
        reference are the base weights (the adapter switched off) [ours]."""
        base = self.lora and (
            (view == "student_priv" and self.privileged_mode == "initial")
            or (view == "reference" and self.reference is None)
        )
        return self.student.disable_adapter() if base else contextlib.nullcontext()

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
            return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        return float(accelerator.clip_grad_norm_(self.student_call.parameters(), max_norm))

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


@dataclass
class TrainingData:
    """The training records after the preflight, their adapters, and the records left out."""

    records: object  # a list or a memory-mapped DatasetRecords
    adapters: dict[str, object]  # "student" / "teacher": the modality adapter of each model's processing
    picker: RecordPicker
    skipped: list[dict] = field(default_factory=list)
    preflight_skipped: int = 0

    def pick(self, index: int, step: int) -> tuple[dict, bool]:
        """Record `index`, or under `skip` the next one whose image files are still all there;
        True when a record was newly skipped."""
        record, found = self.picker.pick(index, step)
        self.skipped += found
        return record, bool(found)

    def write_skipped(self, output_dir: Path, main: bool, process_index: int) -> None:
        """output_dir/skipped.jsonl (another process: skipped.rankN.jsonl): every record left out, and why."""
        if self.skipped and output_dir.is_dir():
            name = "skipped.jsonl" if main else f"skipped.rank{process_index}.jsonl"
            (output_dir / name).write_text("".join(json.dumps(r) + "\n" for r in self.skipped), encoding="utf-8")


def setup_data(
    c: TrainConfig, models: RunModels, scored_views: tuple[str, ...], objective: Objective, progress: bool
) -> TrainingData:
    """The adapters and the preflight (§3.1): faulty records stop here (fail) or are left out (skip)."""
    root = image_roots(records_root(c.data.train), c.data.image_roots)  # where image paths may lead
    adapters = {
        "student": make_adapter(models.processing, c.data.prompt, image_root=root),
        "teacher": make_adapter(models.teacher_processing, c.data.prompt, image_root=root),
    }
    privileged = bool(PRIVILEGED_VIEWS & set(scored_views))
    records, skipped = preflight_records(
        c.data,
        adapters["student"],
        max_prompt_length=c.rollout.max_prompt_length,
        privileged=privileged,
        progress=progress,
    )
    if objective.name == "vision_opd":
        _check_image_context(records, c.data.train)
    picker = RecordPicker(records, root, c.data.train, c.data.on_error)
    return TrainingData(records, adapters, picker, skipped, len(skipped))


def setup_optimizer(c: TrainConfig, models: RunModels, accelerator):
    """AdamW over the trainable parameters (after sharding: FSDP replaces them) with a cosine
    schedule; under `parallel: ddp` accelerate wraps the student's call in DDP here."""
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in models.student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=c.optim.lr, weight_decay=c.optim.weight_decay, betas=tuple(c.optim.adam_betas)
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, c.optim.warmup_steps, c.max_steps)
    if not models.sharded:
        models.student_call, optimizer = accelerator.prepare(models.student_call, optimizer)
    return optimizer, scheduler


def setup_loss_backend(
    c: TrainConfig, objective: Objective, models: RunModels, scored_views, accelerator
) -> RunBackends:
    """§2: the Triton kernels check themselves first on the run's real heads; `auto` may fall back to torch."""
    device = accelerator.device
    backend, check = resolve_loss_backend(c.loss_backend, device), None
    if backend == "triton":
        heads = {v: call_model(models.scorer(v), output_embedding_weight) for v in objective.views}
        student_head = call_model(models.live_student, output_embedding_weight)
        backend, check = checked_triton_backend(
            c.loss_backend, objective, student_head, heads, models.vocab_size, seed=c.seed,
            any_failed=lambda failed: sum_over_processes(accelerator, float(failed)) > 0,
        )  # fmt: skip
        release(models.student_call)
        models.release(scored_views)
    chunk = c.loss_chunk_size
    if chunk == "auto":
        chunk = auto_chunk_size(device, models.vocab_size, backend=backend)
    return RunBackends(backend, check, chunk, resolve_generation(c.rollout.generation, device))


def setup_rollout_engine(c: TrainConfig, models: RunModels, data: TrainingData, accelerator):
    """`rollout.engine`: `hf` samples with the live student; `vllm` starts one colocated engine per
    process from the student's folder and loads the live student's weights into it at once."""
    if c.rollout.engine == "hf":
        return HFEngine()
    adapter = data.adapters["student"]
    max_model_len = c.rollout.vllm.max_model_len
    if not max_model_len:
        longest = c.rollout.max_prompt_length or max(
            adapter.prompt(data.records[i], "student").input_ids.numel() for i in range(len(data.records))
        )
        max_model_len = longest + c.rollout.max_new_tokens
    engine = VllmEngine(
        resolve_model_path(c.student.name_or_path),
        c.rollout,
        dtype=str(next(models.student.parameters()).dtype).removeprefix("torch."),
        device=accelerator.device,
        max_model_len=max_model_len,
        vocab_size=models.vocab_size,
        eos_token_ids=models.eos_token_ids,
        suppress_token_ids=models.suppress_ids,
        num_processes=accelerator.num_processes,
        seed=c.seed + accelerator.process_index,
        vision=hasattr(models.processing, "image_processor"),
    )
    engine.sync(models.student)
    return engine


def _check_image_context(records, source: str) -> None:
    """vision_opd needs an image (e.g. the `crop` format's evidence crop) in the privileged context."""
    record = records[0]
    context = record.get("privileged_context")
    if not (isinstance(context, list) and any(part.get("type") == "image" for part in context)):
        raise DatasetError(
            "objective vision_opd needs an image in the privileged context; build the data with "
            "`dopd build grounding ... --privileged-format crop`",
            file=source,
            record=record.get("id", "?"),
            field="privileged_context",
        )
