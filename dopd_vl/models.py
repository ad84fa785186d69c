"""Loading students and teachers, and building tiny Qwen3 / Qwen3-VL models (docs/design.md §3.3).

Real models load with `from_pretrained` from a hub id or a local folder through the Auto classes.
Tiny models are built from configs and saved with `save_pretrained` (weights as safetensors, with
tokenizer and processor), so tests and the demo load them through the very same code path.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from dopd_vl.errors import ModelError
from dopd_vl.files import give_created_modes

logger = logging.getLogger(__name__)

SHIPPED_TOKENIZER_DIR = Path(__file__).parent / "assets" / "qwen3_tokenizer"
QWEN3_VL_CHAT_TEMPLATE = SHIPPED_TOKENIZER_DIR / "qwen3_vl_chat_template.jinja"
VISION_SPECIAL_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}  # float64: exactness tests

__all__ = [
    "SHIPPED_TOKENIZER_DIR",
    "VISION_SPECIAL_TOKENS",
    "resolve_model_path",
    "load_tokenizer",
    "load_processing",
    "load_model",
    "resolve_device",
    "resolve_dtype",
    "is_vision_model",
    "build_tiny_qwen3",
    "build_tiny_qwen3_vl",
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
    "save_model_folder",
]


def resolve_model_path(name_or_path: str | Path) -> str:
    """`tiny:qwen3` / `tiny:qwen3-vl[:key=value,...]` build a tiny random model once into a cache
    folder ($DOPD_TINY_CACHE, default ~/.cache/dopd-vl/tiny) and return that folder; anything else
    (hub id or local path) is returned unchanged. Loading then goes through from_pretrained."""
    name = str(name_or_path)
    if not name.startswith("tiny:"):
        return name
    kind, _, spec = name[len("tiny:"):].partition(":")
    builders = {"qwen3": build_tiny_qwen3, "qwen3-vl": build_tiny_qwen3_vl}
    if kind not in builders:
        raise ModelError(f"unknown tiny model {kind!r} in {name!r}; use tiny:qwen3 or tiny:qwen3-vl")
    kwargs = {}
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ModelError(f"{name!r}: expected key=value items after the kind, got {item!r}")
        kwargs[key] = int(value) if value.lstrip("-").isdigit() else {"true": True, "false": False}.get(value.lower(), value)
    import hashlib
    import os
    import shutil
    import tempfile

    cache = Path(os.environ.get("DOPD_TINY_CACHE", Path.home() / ".cache" / "dopd-vl" / "tiny"))
    folder = cache / f"{kind}-{hashlib.sha1(repr(sorted(kwargs.items())).encode()).hexdigest()[:12]}"
    if not (folder / "config.json").exists() and _distributed_rank() > 0:
        return str(_wait_for_build(folder, name))
    if not (folder / "config.json").exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=cache))
        try:
            builders[kind](tmp, **kwargs)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, TypeError):
                raise ModelError(f"{name!r}: {err}") from err
            raise
        try:  # a folder appears whole (renamed); never delete one, another process may be loading it
            os.replace(tmp, folder)
        except OSError:  # another process (e.g. the other rank of a torchrun job) finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def _distributed_rank() -> int:
    """This process's rank in an initialized process group (0 without one)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _wait_for_build(folder: Path, name: str, timeout_s: float = 600.0) -> Path:
    """Inside a process group transformers' save_pretrained writes on rank 0 only, so rank 0 builds a
    tiny model and the other ranks wait for its folder (renamed into place whole)."""
    import time

    deadline = time.monotonic() + timeout_s
    while not (folder / "config.json").exists():
        if time.monotonic() > deadline:
            raise ModelError(f"{name!r}: rank {_distributed_rank()} waited {timeout_s:.0f} s for rank 0 to build {folder}")
        time.sleep(0.2)
    return folder


def load_tokenizer(name_or_path: str | Path | None = None, trust_remote_code: bool = False):
    """A tokenizer from a hub id or folder; None gives the shipped Qwen3 tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(name_or_path or SHIPPED_TOKENIZER_DIR), trust_remote_code=trust_remote_code)


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
            raise ModelError(f"{name} has {output_embedding_weight(model).shape[0]} lm-head rows, fewer than the tokenizer's {size}")
    return size


def final_hidden_states(model: nn.Module, inputs: dict) -> torch.Tensor:
    """Final (normed) hidden states [B, L, H]: the model without its lm head, so no logits exist."""
    backbone = _unwrap(model).model
    return backbone(**inputs, use_cache=False).last_hidden_state


def output_embedding_weight(model: nn.Module) -> torch.Tensor:
    """The lm-head weight [rows, H] (tied or not); rows may exceed the tokenizer's size."""
    return model.get_output_embeddings().weight


# --------------------------------------------------------------------------------- tiny models
def qwen3_config(
    *, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int, intermediate_size: int, tokenizer,
    head_dim: int | None = None, tie_word_embeddings: bool = True, lm_head_rows: int = 151_936, max_position_embeddings: int = 4096,
):
    """A Qwen3 config of the given shape with the tokenizer's special ids (no weights)."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=max(lm_head_rows, len(tokenizer)), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=head_dim or hidden_size // num_heads, max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_qwen3(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = True,
    lm_head_rows: int = 151_936,
    tokenizer=None,
    seed: int = 0,
) -> Path:
    """A random tiny Qwen3 saved with its tokenizer; loadable with `load_model`."""
    from transformers import Qwen3ForCausalLM

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
    config = qwen3_config(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                          intermediate_size=intermediate_size, tokenizer=tokenizer, tie_word_embeddings=tie_word_embeddings, lm_head_rows=lm_head_rows)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    _set_generation_defaults(model, tokenizer)
    return _save(model, tokenizer, out_dir)


def qwen3_vl_config_and_processor(
    *, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int, intermediate_size: int, tokenizer,
    vision_depth: int, vision_hidden_size: int, vision_intermediate_size: int | None = None, vision_heads: int = 2,
    deepstack: list[int] | None = None, num_position_embeddings: int = 64, head_dim: int | None = None,
    tie_word_embeddings: bool = True, min_pixels: int = 32 * 32, max_pixels: int = 128 * 128, lm_head_rows: int = 151_936,
):
    """A Qwen3-VL config of the given shape and a Qwen3-VL processor (no weights)."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_SPECIAL_TOKENS}
    head_dim = head_dim or hidden_size // num_heads
    # mrope sections (t, h, w) must sum to head_dim / 2; keep Qwen's 2:1:1-ish proportions.
    half = head_dim // 2
    section = [half - 2 * (half // 4), half // 4, half // 4]
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=max(lm_head_rows, len(tokenizer)), hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
            head_dim=head_dim, max_position_embeddings=4096, tie_word_embeddings=tie_word_embeddings,
            rope_scaling={"rope_type": "default", "mrope_section": section, "mrope_interleaved": True},
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            depth=vision_depth, hidden_size=vision_hidden_size, intermediate_size=vision_intermediate_size or 2 * vision_hidden_size,
            num_heads=vision_heads, patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden_size,
            num_position_embeddings=num_position_embeddings,
            deepstack_visual_indexes=deepstack if deepstack is not None else list(range(min(2, vision_depth))),
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings,
    )
    image_processor = Qwen2VLImageProcessor(
        patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=min_pixels, max_pixels=max_pixels,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    processor = Qwen3VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2),
        chat_template=QWEN3_VL_CHAT_TEMPLATE.read_text(),
    )
    return config, processor


def build_tiny_qwen3_vl(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vision_depth: int = 2,
    vision_hidden_size: int = 32,
    min_pixels: int = 32 * 32,
    max_pixels: int = 128 * 128,
    lm_head_rows: int = 151_936,
    tokenizer=None,
    seed: int = 0,
) -> Path:
    """A random tiny Qwen3-VL saved with a Qwen3-VL processor (AutoProcessor returns it).

    Image sizes are capped by `min_pixels` / `max_pixels` so that a COCO image costs a handful of
    visual tokens on CPU; real Qwen3-VL processors keep their own (much larger) limits.
    """
    from transformers import Qwen3VLForConditionalGeneration

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
    config, processor = qwen3_vl_config_and_processor(
        hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
        tokenizer=tokenizer, vision_depth=vision_depth, vision_hidden_size=vision_hidden_size, min_pixels=min_pixels, max_pixels=max_pixels,
        lm_head_rows=lm_head_rows,
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    _set_generation_defaults(model, tokenizer)
    return _save(model, processor, out_dir)


def _set_generation_defaults(model, tokenizer) -> None:
    gen = model.generation_config
    gen.eos_token_id = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    gen.pad_token_id = tokenizer.pad_token_id
    gen.do_sample, gen.temperature, gen.top_p, gen.top_k = True, 1.0, 1.0, 0


def _save(model, processing, out_dir) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model_folder(model, processing, out)
    logger.info("saved %s (%.2f M parameters) to %s", type(model).__name__, sum(p.numel() for p in model.parameters()) / 1e6, out)
    return out


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
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def save_model_folder(model: nn.Module, processing, folder: str | Path, state_dict: dict | None = None) -> Path:
    """`save_pretrained` of a model (safetensors; `state_dict` instead of the model's own, e.g. a
    sharded model's gathered weights) and its tokenizer or processor into `folder`, whose files
    then get the mode a created file would (the shards arrive as 0600)."""
    model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
    if processing is not None:
        processing.save_pretrained(folder)
    give_created_modes(folder)
    return Path(folder)
