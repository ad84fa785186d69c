"""Loading students and teachers, and what the engine asks of a loaded model (docs/design.md §3.3).

Models load with `from_pretrained` from a hub id or a local folder through the Auto classes; a
`tiny:` spec is first built into a cache folder (models/tiny.py), so tests and the demo load tiny
models through the very same code path.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from dopd_vl.errors import ModelError
from dopd_vl.models.folders import VISION_SPECIAL_TOKENS
from dopd_vl.models.tiny import resolve_model_path

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}  # float64: exactness tests

__all__ = [
    "load_processing",
    "load_model",
    "resolve_device",
    "resolve_dtype",
    "is_vision_model",
    "final_hidden_states",
    "output_embedding_weight",
    "model_from_config",
    "tokenizer_of",
    "vocab_size",
    "check_same_tokenizer",
    "vision_token_ids",
    "never_sampled_token_ids",
    "eos_token_ids",
    "with_lora",
    "lora_parts",
    "is_vision_processing",
]


def load_processing(name_or_path: str | Path, trust_remote_code: bool = False):
    """The processor of a vision model (tokenizer + image processor), else the tokenizer."""
    from transformers import AutoProcessor, AutoTokenizer

    name_or_path = resolve_model_path(name_or_path)
    if _is_vision_config(name_or_path, trust_remote_code):
        processor = AutoProcessor.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
        if not hasattr(processor, "image_processor"):
            raise ModelError(
                f"{name_or_path}: a vision model, but AutoProcessor returned {type(processor).__name__}; "
                "the folder needs a processor_config.json naming its processor class"
            )
        return processor
    return AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """`auto` (or None): the first CUDA GPU when one is present, else the CPU; `cpu`, `cuda`, `cuda:N`."""
    if isinstance(spec, torch.device):
        return spec
    if spec in (None, "auto"):
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as err:
        raise ModelError(f"device must be auto, cpu, cuda or cuda:N, got {spec!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {spec!r} asked for, but no CUDA GPU is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ModelError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA GPU(s) present")
    if device.type not in ("cpu", "cuda"):
        raise ModelError(f"device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    return device


def resolve_dtype(spec: str, device: torch.device | str | None = None) -> str:
    """`auto`: bfloat16 on a GPU that supports it, float32 otherwise (CPU); else the name itself."""
    if spec != "auto":
        if spec not in _DTYPES:
            raise ModelError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {spec!r}")
        return spec
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def load_model(
    name_or_path: str | Path,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
) -> nn.Module:
    """A causal LM (text) or image-text-to-text model (Qwen3-VL) via the Auto classes, placed on
    `device` (a name or `auto`, see `resolve_device`; None leaves it where it loads) in `dtype`
    (`auto`: see `resolve_dtype`)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if device is not None:
        device = resolve_device(device)
    dtype = resolve_dtype(dtype, device if device is not None else torch.device("cpu"))
    if dtype not in _DTYPES:
        raise ModelError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    name_or_path = resolve_model_path(name_or_path)
    auto = AutoModelForImageTextToText if _is_vision_config(name_or_path, trust_remote_code) else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(str(name_or_path), dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code)
    except OSError as err:  # missing folder / no hub access: one clear line
        raise ModelError(f"cannot load model {name_or_path!r}: {err}") from err
    if device is not None:
        model.to(device)
    return model


def model_from_config(folder: str | Path, dtype: str = "float32") -> nn.Module:
    """The model a saved config describes, with freshly initialised weights (for a checkpoint whose
    weights are elsewhere, e.g. the shards of a `parallel: fsdp` run)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if _is_vision_config(folder, False) else AutoModelForCausalLM
    return auto.from_config(AutoConfig.from_pretrained(str(folder)), dtype=_DTYPES[dtype])


def is_vision_model(model: nn.Module) -> bool:
    return getattr(_unwrap(model).config, "vision_config", None) is not None


def is_vision_processing(processing) -> bool:
    """Whether a model's processing object is a processor with an image processor (Qwen3-VL), not a tokenizer."""
    return getattr(processing, "image_processor", None) is not None


def lora_parts(model: nn.Module) -> tuple[nn.Module, list[tuple[str, nn.Module]]]:
    """A peft (LoRA) model's base model and its adapted layers (name, layer); any other model is its
    own base with no adapted layer."""
    try:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft is an extra: without it no model is a peft model
        return model, []
    if not isinstance(model, PeftModel):
        return model, []
    base = model.get_base_model()
    return base, [(name, m) for name, m in base.named_modules() if isinstance(m, BaseTunerLayer)]


def tokenizer_of(processing):
    """The tokenizer inside a processor, or the tokenizer itself."""
    return getattr(processing, "tokenizer", processing)


def vocab_size(processing) -> int:
    """Number of real token ids (lm-head rows beyond it are padding and are dropped)."""
    return len(tokenizer_of(processing))


def vision_token_ids(processing) -> list[int]:
    """Ids of the vision special tokens, which rollout never samples."""
    tok = tokenizer_of(processing)
    ids = [tok.convert_tokens_to_ids(t) for t in VISION_SPECIAL_TOKENS]
    return [i for i in ids if i is not None and i != tok.unk_token_id]


def never_sampled_token_ids(processing, model: nn.Module) -> list[int]:
    """Ids rollout must never sample: vision special tokens and lm-head rows beyond the tokenizer
    (padding rows; a trained model gives them ~0 probability, a fresh one does not)."""
    ids = vision_token_ids(processing) if hasattr(processing, "image_processor") else []
    return ids + list(range(vocab_size(processing), output_embedding_weight(model).shape[0]))


def eos_token_ids(processing, model: nn.Module) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and the generation config's."""
    configured = model.generation_config.eos_token_id
    configured = list(configured) if isinstance(configured, (list, tuple)) else [configured]
    return sorted({tokenizer_of(processing).eos_token_id, *configured} - {None})


def check_same_tokenizer(student_processing, teacher_processing, student_model=None, teacher_model=None) -> int:
    """Teacher and student must share a tokenizer (docs/design.md §1.5); returns the shared vocab size."""
    s_tok, t_tok = tokenizer_of(student_processing), tokenizer_of(teacher_processing)
    if len(s_tok) != len(t_tok) or s_tok.get_vocab() != t_tok.get_vocab():
        raise ModelError(
            f"teacher and student tokenizers differ (student {len(s_tok)} tokens, teacher {len(t_tok)}); "
            "on-policy distillation scores the student's token ids with the teacher, so both must share one tokenizer"
        )
    size = len(s_tok)
    for name, model in (("student", student_model), ("teacher", teacher_model)):
        if model is not None and output_embedding_weight(model).shape[0] < size:
            raise ModelError(
                f"{name} has {output_embedding_weight(model).shape[0]} lm-head rows, fewer than the tokenizer's {size}"
            )
    return size


def final_hidden_states(model: nn.Module, inputs: dict) -> torch.Tensor:
    """Final (normed) hidden states [B, L, H]: the model without its lm head, so no logits exist."""
    backbone = _unwrap(model).model
    return backbone(**inputs, use_cache=False).last_hidden_state


def output_embedding_weight(model: nn.Module) -> torch.Tensor:
    """The lm-head weight [rows, H] (tied or not); rows may exceed the tokenizer's size."""
    return model.get_output_embeddings().weight


def _is_vision_config(name_or_path, trust_remote_code: bool) -> bool:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ModelError(f"cannot load the config of {name_or_path!r}: {err}") from err
    return getattr(config, "vision_config", None) is not None


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a peft or accelerate wrapper."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return getattr(model, "module", model)


def with_lora(model: nn.Module, lora) -> nn.Module:
    """The model wrapped with LoRA adapters from a recipe's `lora` section (peft, an optional extra)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ModelError("lora.enabled needs peft: pip install 'dopd-vl[peft]'") from err
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)
