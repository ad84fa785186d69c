"""Recipes: YAML files loaded into dataclasses, with `section.key=value` overrides.

Unknown keys are errors that list the valid ones; override values are parsed as YAML scalars
and type-checked against the field they set. Files are read with `yaml.safe_load` only.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dopd_vl.errors import ConfigError
from dopd_vl.method.objectives import ObjectiveConfig
from dopd_vl.modality.prompts import PromptConfig
from dopd_vl.training.guard import CollapseGuardConfig
from dopd_vl.training.rollout import RolloutConfig

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")

__all__ = [
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "LoRAConfig",
    "TrainConfig",
    "load_config",
    "apply_overrides",
    "config_to_dict",
    "flat_config",
]


@dataclass
class ModelConfig:
    name_or_path: str = ""
    """Hub id or local folder, loaded with from_pretrained."""
    dtype: str = "float32"
    """float32 | bfloat16 | float16, or auto (bfloat16 on GPUs that support it, else float32)."""
    trust_remote_code: bool = False
    """Off by default (security); turn on only for models you trust."""
    shard: bool | None = None
    """Under `parallel: fsdp`: shard this model's weights over the processes (the default) or keep
    a whole copy on each (`false`; the teacher only: the student is always sharded) [ours]."""


@dataclass
class DataConfig:
    train: str = ""
    """Training records: JSONL, Parquet / Arrow file, `save_to_disk` folder, or a dataset id /
    folder for `load_dataset` (dopd_vl/data/sources.py); relative image paths resolve against its folder."""
    split: str = "train"
    """Split of a datasets source."""
    columns: dict = field(default_factory=dict)
    """Record field -> column name, for datasets with other names, e.g. {prompt: question}."""
    eval: str | None = None
    """Optional held-out records for `dopd eval`."""
    prompt: PromptConfig = field(default_factory=PromptConfig)
    image_roots: list[str] = field(default_factory=list)
    """Folders image paths may also lead into, besides the dataset's own folder and the trusted
    roots the builders record (docs/design.md §3.1); a path outside all of them is an error.
    Relative folders are taken from the working directory, like `train` [ours]."""
    preflight: str = "quick"
    """Check every training record before the first step (dopd_vl/data/preflight.py): `quick` (images
    opened and checked for completeness by their end marker), `full` (images fully decoded) or
    `off` [ours]."""
    on_error: str = "fail"
    """A faulty record: `fail` stops (before the first step, or when a file vanishes mid-run) naming
    the file, record and field; `skip` trains on the rest and lists the skipped ones in
    output_dir/skipped.jsonl (`data/skipped_records` in the metrics) [ours]."""

    verifier: str = "auto"
    """What checks an answer (dopd_vl/data/verify.py): `auto`, `number`, `exact`, `choice`, `box`, a
    name given to `register_verifier`, or `module:function`. Verdicts on the student's responses
    give `verify/*` each step; `objective.trust: verified`, `teacher_filter` and uni_opd train on them [ours]."""
    teacher_verdicts: str | None = None
    """A teacher_verdicts.jsonl (`dopd verify-teacher`) to read instead of computing the privileged
    teacher's verdicts before the first step; None: computed once per run, kept in output_dir [ours]."""
    teacher_filter: str = "none"
    """`verified`: train only on records whose privileged teacher's greedy answer the verifier marks
    right (the practitioner's baseline, any objective); `none`: every record [ours]."""

    def __post_init__(self) -> None:
        if self.teacher_filter not in ("none", "verified"):
            raise ValueError(f"data.teacher_filter must be none or verified, got {self.teacher_filter!r}")
        if self.preflight not in ("quick", "full", "off"):
            raise ValueError(f"data.preflight must be quick, full or off, got {self.preflight!r}")
        if self.on_error not in ("fail", "skip"):
            raise ValueError(f"data.on_error must be fail or skip, got {self.on_error!r}")


@dataclass
class OptimConfig:
    lr: float = 5e-6
    """AdamW learning rate [paper]."""
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 8
    """Prompts per micro-batch per process; each yields `rollout.num_generations` responses."""
    gradient_accumulation_steps: int = 1
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class LoRAConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class TrainConfig:
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output_dir: str = "runs/dopd"
    max_steps: int = 100
    seed: int = 0
    save_steps: int = 50
    """Checkpoint every N optimizer steps (and at the end)."""
    save_total_limit: int = 2
    """Keep the newest N checkpoints."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    loss_chunk_size: int | str = "auto"
    """Tokens per chunk of the routed loss (memory ~ chunk x vocab x 4 bytes x ~7 intermediates):
    an integer, or `auto` (64 on CPU, where small chunks were fastest; on a GPU the largest chunk
    whose intermediates fit a budget of min(4 GiB, 10% of free memory), 64..2048) [ours]."""
    loss_backend: str = "auto"
    """Routed loss per chunk: `torch` (autograd), `triton` (fused kernels, dopd_vl/loss/kernels.py) or
    `auto` (triton on CUDA when Triton is installed, else torch) [ours]."""
    max_consecutive_skips: int = 5
    """Non-finite steps in a row before training stops."""
    report_to: list[str] = field(default_factory=list)
    """accelerate trackers, e.g. [tensorboard] or [wandb]."""
    gradient_checkpointing: bool = False
    device: str = "auto"
    """auto: accelerate's choice (the GPU of this process when present); cpu forces the CPU."""
    parallel: str = "ddp"
    """Several processes: `ddp` (a whole student per process, gradients all-reduced) or `fsdp`
    (PyTorch FSDP2: student, frozen copies and, unless teacher.shard=false, the teacher sharded per
    transformer block; docs/design.md §4.6) [ours]."""
    collapse_action: str = "warn"
    """What the collapse guard does when the student collapses (dopd_vl/training/guard.py): `warn` once,
    `stop` after a clean checkpoint, or `off` [ours]."""
    collapse_guard: CollapseGuardConfig = field(default_factory=CollapseGuardConfig)
    """The guard's reference window and thresholds [ours]."""
    diagnostics: bool = False
    """Also score every view `dopd diagnose` reads (teacher with and without the context, the
    privileged student) at each step and log `diag/*` metrics: DOPD's regime shares with and
    without the edge check, the teacher's endorsement rate, the information edge. Costs up to
    three extra scoring passes; training is unchanged [ours]."""

    def __post_init__(self) -> None:
        if self.loss_chunk_size != "auto" and not (isinstance(self.loss_chunk_size, int) and self.loss_chunk_size >= 1):
            raise ValueError(f"loss_chunk_size must be a positive integer or auto, got {self.loss_chunk_size!r}")
        if self.loss_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"loss_backend must be auto, torch or triton, got {self.loss_backend!r}")
        if self.device not in ("auto", "cpu"):
            raise ValueError(
                f"device must be auto or cpu (accelerate places each process on its GPU), got {self.device!r}"
            )
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel must be ddp or fsdp, got {self.parallel!r}")
        if self.parallel == "fsdp" and self.student.shard is False:
            raise ValueError(
                "parallel: fsdp always shards the student; student.shard=false is only for parallel: ddp (where it "
                "changes nothing)"
            )
        if self.parallel == "fsdp" and self.lora.enabled:
            raise ValueError(
                "parallel: fsdp with LoRA is not supported (not built or tested yet); LoRA runs use parallel: ddp"
            )
        if self.collapse_action not in ("warn", "stop", "off"):
            raise ValueError(f"collapse_action must be warn, stop or off, got {self.collapse_action!r}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """A TrainConfig from a YAML recipe (or defaults) plus `key=value` overrides."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping of keys to values")
    raw = apply_overrides(raw, overrides or [])
    try:
        return _build(TrainConfig, raw, "")
    except ConfigError as err:  # say where an unknown key came from: an override or the file
        key = getattr(err, "key", None)
        if key is None:
            raise
        given = [item for item in overrides or [] if f"{item.partition('=')[0]}.".startswith(f"{key}.")]
        source = f"the override {given[0]!r}" if given else f"the recipe {path}" if path else "the defaults"
        raise ConfigError(f"{err} (from {source})") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`a.b.c=value` sets raw["a"]["b"]["c"]; the value is parsed as YAML (so 1e-5, true, [1, 2])."""
    raw = dict(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: invalid value: {err}") from err
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[parts[-1]] = parsed
    return raw


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def flat_config(config) -> dict:
    """`section.key` -> scalar, the form experiment trackers take."""
    return _flat(config_to_dict(config))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _build(cls, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'the recipe'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        close = difflib.get_close_matches(unknown[0], list(fields), n=1)
        guess = f"did you mean {prefix}{close[0]}? " if close else ""
        err = ConfigError(
            f"unknown config key {prefix}{unknown[0]}; {guess}valid keys{' of ' + where if where else ''}: "
            f"{', '.join(sorted(fields))}"
        )
        err.key = f"{prefix}{unknown[0]}"
        raise err
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        values[name] = _convert(hints[name], value, f"{where}.{name}" if where else name)
    try:
        return cls(**values)
    except ValueError as err:  # a dataclass's own checks (e.g. ObjectiveConfig.__post_init__)
        raise ConfigError(str(err)) from err


def _convert(tp, value, where: str):
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return value
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads "1e-5" (no dot) as a string; users mean the number
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool) and where.endswith("name_or_path"):
        return str(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where} must be of type {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value
