"""What a model folder holds: the shipped Qwen3 tokenizer and `save_model_folder` (safetensors and
the tokenizer or processor, with the file modes a created file gets)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from dopd_vl.files import give_created_modes

__all__ = [
    "SHIPPED_TOKENIZER_DIR",
    "QWEN3_VL_CHAT_TEMPLATE",
    "VISION_SPECIAL_TOKENS",
    "load_tokenizer",
    "save_model_folder",
]

SHIPPED_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "qwen3_tokenizer"
QWEN3_VL_CHAT_TEMPLATE = SHIPPED_TOKENIZER_DIR / "qwen3_vl_chat_template.jinja"
VISION_SPECIAL_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")


def load_tokenizer(name_or_path: str | Path | None = None, trust_remote_code: bool = False):
    """A tokenizer from a hub id or folder; None gives the shipped Qwen3 tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        str(name_or_path or SHIPPED_TOKENIZER_DIR), trust_remote_code=trust_remote_code
    )


def save_model_folder(model: nn.Module, processing, folder: str | Path, state_dict: dict | None = None) -> Path:
    """`save_pretrained` of a model (safetensors; `state_dict` instead of the model's own, e.g. a
    sharded model's gathered weights) and its tokenizer or processor into `folder`, whose files
    then get the mode a created file would (the shards arrive as 0600)."""
    model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
    if processing is not None:
        processing.save_pretrained(folder)
    give_created_modes(folder)
    return Path(folder)
