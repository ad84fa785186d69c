"""A run, built once before its first step (docs/design.md §4): `setup_run(config)` returns the
`Run` every driver uses (the trainer, `dopd diagnose`, the studies' readouts), in named steps:

* `setup_models` (models.py): the student, the teacher, the frozen copies, sharded under
  `parallel: fsdp` (§4.6), and the scorer table (which model scores each view);
* `setup_data`: the adapters, the preflight of every record (§3.1), the mid-run record picker;
* `setup_optimizer`: AdamW with the cosine schedule, and DDP through accelerate (`parallel: ddp`);
* `setup_loss_backend`: the loss backend (the Triton kernels' self-check, §2), chunking and generation;
* `setup_rollout_engine`: what samples the rollouts (Hugging Face `generate` or a colocated vLLM, §4.1).

A `Run` holds components, not the loop's state: the step counter, the skip counts and the collapse
guard are the `Trainer`'s. The step's parts are functions of a Run and a step number
(dopd_vl/training/step.py), so any driver samples and scores exactly what training would.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from dopd_vl.data.image_roots import image_roots
from dopd_vl.data.schema import record_id
from dopd_vl.data.sources import records_root
from dopd_vl.data.training_set import RecordPicker, preflight_records
from dopd_vl.data.verify import VERIFIERS, Verifier, get_verifier
from dopd_vl.distributed import any_process
from dopd_vl.errors import ConfigError, DatasetError
from dopd_vl.loss.chunked import auto_chunk_size
from dopd_vl.loss.kernels import resolve_loss_backend
from dopd_vl.loss.selfcheck import checked_triton_backend
from dopd_vl.method.objectives import Objective, build_objective
from dopd_vl.method.views import DIAGNOSTIC_VIEWS, PRIVILEGED_VIEWS, SCORING_VIEWS
from dopd_vl.modality.adapters import make_adapter
from dopd_vl.models.loading import is_vision_processing, output_embedding_weight
from dopd_vl.models.parallel import call_model, release
from dopd_vl.models.tiny import resolve_model_path
from dopd_vl.training.checkpointing import Checkpointer
from dopd_vl.training.config import TrainConfig, config_to_dict
from dopd_vl.training.engines import HFEngine, RolloutEngine, VllmEngine
from dopd_vl.training.models import RunModels, setup_models
from dopd_vl.training.rollout import resolve_generation
from dopd_vl.training.routed_loss import RoutedLoss
from dopd_vl.training.teacher_verdicts import (
    VERDICTS_FILE,
    question_type,
    read_teacher_verdicts,
    report_line,
    teacher_answers,
    teacher_verdict_rows,
    verdict_report,
    write_teacher_verdicts,
)
from dopd_vl.version import __version__

logger = logging.getLogger(__name__)

__all__ = [
    "Run",
    "RunBackends",
    "run_info",
    "write_run_files",
    "backend_metrics",
    "setup_run",
    "TrainingData",
    "setup_data",
    "setup_optimizer",
    "setup_loss_backend",
    "setup_rollout_engine",
    "verdicts_needed_by",
    "needs_teacher_verdicts",
]


@dataclass
class Run:
    """Everything a run is made of, built once by `setup_run`; the loop's state is the Trainer's."""

    config: TrainConfig
    accelerator: object  # accelerate.Accelerator: devices, processes, DDP, trackers
    objective: Objective
    scored_views: tuple[str, ...]  # the objective's views, plus the diagnostics' (§1.11)
    models: RunModels
    data: TrainingData
    optimizer: torch.optim.Optimizer
    scheduler: object
    checkpointer: Checkpointer
    backends: RunBackends
    loss: RoutedLoss
    engine: RolloutEngine

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def tokenizer(self):
        return self.models.tokenizer

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    def info(self) -> dict:
        """What this run used where a setting left the choice open: output_dir/run.json."""
        n = self.accelerator.num_processes
        info = run_info(self.config, self.backends, self.device, n, len(self.data.records), self.data.preflight_skipped)
        if self.config.data.teacher_filter == "verified":
            info["data"]["teacher_filtered_records"] = self.data.filtered_out
        return info

    def prepare_teacher_verdicts(self, reuse: bool = True) -> dict | None:
        """Before the first step, when the run reads them: the privileged teacher's verdict on
        every training record, read from `data.teacher_verdicts`, reused from output_dir (`reuse`:
        a resumed run), or computed now (greedy, the teacher frozen) and kept in
        output_dir/teacher_verdicts.jsonl; then `data.teacher_filter`. Returns the accuracy report
        (None when the run reads no verdicts). Every process computes its share."""
        c, a = self.config, self.accelerator
        if not needs_teacher_verdicts(c, self.objective) or self.data.teacher_verdicts is not None:
            return None
        records, kept = self.data.records, self.output_dir / VERDICTS_FILE
        source = (
            Path(c.data.teacher_verdicts) if c.data.teacher_verdicts else kept if reuse and kept.is_file() else None
        )
        if source is not None:
            by_id = read_teacher_verdicts(source, records)
            rows = [
                {
                    "id": record_id(records[i], i),
                    "type": question_type(records[i]),
                    "verdict": by_id[record_id(records[i], i)],
                }
                for i in range(len(records))
            ]
            logger.info("teacher verdicts read from %s", source)
        else:
            mine = list(range(a.process_index, len(records), a.num_processes))
            width = c.optim.batch_size * c.rollout.num_generations  # as many prompts as a rollout generates at once
            answers = self.models.with_full_teacher(
                lambda teacher: teacher_answers(
                    teacher, self.data.adapters["teacher"], [records[i] for i in mine], self.models.eos_token_ids,
                    self.models.suppress_ids, c.rollout.max_new_tokens, batch_size=width,
                )
            )  # fmt: skip
            rows = teacher_verdict_rows([records[i] for i in mine], answers, self.data.verifier)
            if a.num_processes > 1:
                from accelerate.utils import gather_object

                rows = gather_object(rows)
            if a.is_main_process:
                write_teacher_verdicts(kept, rows)
        self.data.teacher_verdicts = {row["id"]: row["verdict"] for row in rows}
        report = verdict_report(rows)
        logger.info("%s", report_line(report))
        if c.data.teacher_filter == "verified":
            self.data.keep_verified()
            logger.info(
                "data.teacher_filter=verified: %d of %d records kept (the teacher's answer verifies)",
                len(self.data.records), len(records),
            )  # fmt: skip
        return report

    def write_files(self) -> None:
        """run.json and config.yaml (main process), and every process's list of skipped records."""
        a = self.accelerator
        if a.is_main_process and self.output_dir.is_dir():
            write_run_files(self.output_dir, self.config, self.info())
        self.data.write_skipped(self.output_dir, a.is_main_process, a.process_index)


def setup_run(config: TrainConfig, accelerator=None) -> Run:
    """Build a run from its recipe: models, data (after the preflight), optimizer, checkpoints, loss
    backend and rollout engine. Nothing is trained and nothing is written."""
    from accelerate import Accelerator

    c = config
    accelerator = accelerator or Accelerator(
        log_with=c.report_to or None, project_dir=c.output_dir, cpu=c.device == "cpu"
    )
    if accelerator.distributed_type.value == "FSDP" and c.parallel == "ddp":  # it would wrap the student again
        raise ConfigError(
            "the launch configuration asks accelerate for FSDP; dopd-vl shards the models itself: set parallel: "
            "fsdp in the recipe and launch with configs/accelerate/fsdp.yaml (docs/design.md §4.6)"
        )
    objective = build_objective(c.objective)
    verifier = get_verifier(c.data.verifier)  # an unknown verifier stops here, before any model loads
    # The views scored each step: the objective's, plus every view the diagnostics read (§1.11).
    wanted = set(objective.views) | (set(DIAGNOSTIC_VIEWS) if c.diagnostics else set())
    scored_views = tuple(v for v in SCORING_VIEWS if v in wanted)
    models = setup_models(c, objective, scored_views, accelerator.device)
    data = setup_data(c, models, scored_views, objective, progress=accelerator.is_main_process)
    data.verifier = verifier
    optimizer, scheduler = setup_optimizer(c, models, accelerator)
    checkpointer = Checkpointer(c, accelerator, models, optimizer, scheduler)
    backends = setup_loss_backend(c, objective, models, scored_views, accelerator)
    loss = RoutedLoss(objective, models.vocab_size, backends.loss_chunk_size, backends.loss_backend)
    engine = setup_rollout_engine(c, models, data, accelerator, backends)
    return Run(
        c,
        accelerator,
        objective,
        scored_views,
        models,
        data,
        optimizer,
        scheduler,
        checkpointer,
        backends,
        loss,
        engine,
    )


@dataclass
class TrainingData:
    """The training records after the preflight, their adapters, and the records left out."""

    records: object  # a list or a memory-mapped DatasetRecords
    adapters: dict[str, object]  # "student" / "teacher": the modality adapter of each model's processing
    picker: RecordPicker
    skipped: list[dict] = field(default_factory=list)
    preflight_skipped: int = 0
    verifier: Verifier = VERIFIERS["auto"]  # data.verifier: checks the student's and the teacher's answers
    teacher_verdicts: dict[str, bool | None] | None = None  # record id -> the privileged teacher's verdict
    filtered_out: int = 0  # records data.teacher_filter left out (their teacher verdict is not right)

    def teacher_verdict(self, record: dict) -> bool | None:
        """The privileged teacher's verdict on a record (None: none computed, or no answer)."""
        return None if self.teacher_verdicts is None else self.teacher_verdicts.get(str(record.get("id")))

    def keep_verified(self) -> None:
        """data.teacher_filter: verified: only the records whose teacher verdict is right stay."""
        records = self.records
        keep = [i for i in range(len(records)) if self.teacher_verdict(records[i]) is True]
        if not keep:
            raise DatasetError(
                "data.teacher_filter=verified: the privileged teacher answers no training record right; nothing to "
                f"train on (its verdicts: {VERDICTS_FILE})",
                field="answer",
            )
        self.filtered_out = len(records) - len(keep)
        self.records = [records[i] for i in keep] if isinstance(records, list) else records.subset(keep)
        self.picker = RecordPicker(self.records, self.picker.root, self.picker.source, self.picker.on_error)

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
        answer_needed_by=verdicts_needed_by(c, objective),
    )
    if objective.name == "vision_opd":
        _check_image_context(records, c.data.train)
    picker = RecordPicker(records, root, c.data.train, c.data.on_error)
    return TrainingData(records, adapters, picker, skipped, len(skipped))


def verdicts_needed_by(c: TrainConfig, objective: Objective) -> str | None:
    """What in the recipe reads verdicts (and so needs every record's `answer`), or None."""
    if objective.teacher_verdicts:
        return "objective.trust: verified"
    if objective.response_verdicts:
        return f"objective {objective.name}"
    return "data.teacher_filter: verified" if c.data.teacher_filter == "verified" else None


def needs_teacher_verdicts(c: TrainConfig, objective: Objective) -> bool:
    """Whether the run reads the privileged teacher's verdicts (trust: verified, teacher_filter)."""
    return objective.teacher_verdicts or c.data.teacher_filter == "verified"


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
            any_failed=lambda failed: any_process(accelerator, failed),
        )  # fmt: skip
        release(models.student_call)
        models.release(scored_views)
    chunk = c.loss_chunk_size
    if chunk == "auto":
        chunk = auto_chunk_size(device, models.vocab_size, backend=backend)
    return RunBackends(backend, check, chunk, resolve_generation(c.rollout.generation, device))


def setup_rollout_engine(
    c: TrainConfig, models: RunModels, data: TrainingData, accelerator, backends: RunBackends
) -> RolloutEngine:
    """`rollout.engine`: `hf` samples with the live student (in `backends.generation`, falling back
    to eager from a failed compile under `auto`); `vllm` starts one colocated engine per process from
    the student's folder and loads the live student's weights into it at once."""
    if c.rollout.engine == "hf":
        return HFEngine(backends.generation, fallback=c.rollout.generation == "auto", backends=backends)
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
        vision=is_vision_processing(models.processing),
        accelerator=accelerator,
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


# ------------------------------------------------------------------- what the run used (run.json)
# What a run used where a setting left the choice open (docs/design.md §2, §4.6): `run.json` and
# the recipe as trained (`config.yaml`) in the output folder, which `dopd export` puts in the card,
# and the same facts as metrics on the first line the run logs.
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
