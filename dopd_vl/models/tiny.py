"""Tiny random Qwen3 / Qwen3-VL models for tests and the offline demo (docs/design.md §3.3).

Built from configs at the real vocabulary and saved with `save_pretrained` (weights as
safetensors, with tokenizer and processor); a `tiny:qwen3` / `tiny:qwen3-vl[:key=value,...]` spec
in a recipe is built once into a cache folder and then loads like any other model folder.
"""

from __future__ import annotations

import logging
import string
from pathlib import Path

import torch

from dopd_vl.distributed import process_rank
from dopd_vl.errors import ModelError
from dopd_vl.models.folders import QWEN3_VL_CHAT_TEMPLATE, VISION_SPECIAL_TOKENS, load_tokenizer, save_model_folder

logger = logging.getLogger(__name__)

__all__ = [
    "resolve_model_path",
    "build_char_tokenizer",
    "qwen3_config",
    "build_tiny_qwen3",
    "qwen3_vl_config_and_processor",
    "build_tiny_qwen3_vl",
    "set_generation_defaults",
]


CHAR_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAR_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_char_tokenizer(out_dir: str | Path | None = None):
    """A character-level PreTrainedTokenizerFast with ChatML special tokens (EOS <|im_end|>): ~100
    ids, for toy tasks and tests whose tiny models learn in minutes (examples/toy_privilege)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(CHAR_SPECIALS + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHAR_CHAT_TEMPLATE
    if out_dir is not None:
        tokenizer.save_pretrained(out_dir)
    return tokenizer


def resolve_model_path(name_or_path: str | Path) -> str:
    """`tiny:qwen3` / `tiny:qwen3-vl[:key=value,...]` build a tiny random model once into a cache
    folder ($DOPD_TINY_CACHE, default ~/.cache/dopd-vl/tiny) and return that folder; anything else
    (hub id or local path) is returned unchanged. Loading then goes through from_pretrained."""
    name = str(name_or_path)
    if not name.startswith("tiny:"):
        return name
    kind, _, spec = name[len("tiny:") :].partition(":")
    builders = {"qwen3": build_tiny_qwen3, "qwen3-vl": build_tiny_qwen3_vl}
    if kind not in builders:
        raise ModelError(f"unknown tiny model {kind!r} in {name!r}; use tiny:qwen3 or tiny:qwen3-vl")
    kwargs = {}
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ModelError(f"{name!r}: expected key=value items after the kind, got {item!r}")
        kwargs[key] = (
            int(value) if value.lstrip("-").isdigit() else {"true": True, "false": False}.get(value.lower(), value)
        )
    import hashlib
    import os
    import shutil
    import tempfile

    cache = Path(os.environ.get("DOPD_TINY_CACHE", Path.home() / ".cache" / "dopd-vl" / "tiny"))
    folder = cache / f"{kind}-{hashlib.sha1(repr(sorted(kwargs.items())).encode()).hexdigest()[:12]}"
    if not (folder / "config.json").exists() and process_rank() > 0:
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


def _wait_for_build(folder: Path, name: str, timeout_s: float = 600.0) -> Path:
    """Inside a process group transformers' save_pretrained writes on rank 0 only, so rank 0 builds a
    tiny model and the other ranks wait for its folder (renamed into place whole)."""
    import time

    deadline = time.monotonic() + timeout_s
    while not (folder / "config.json").exists():
        if time.monotonic() > deadline:
            raise ModelError(f"{name!r}: rank {process_rank()} waited {timeout_s:.0f} s for rank 0 to build {folder}")
        time.sleep(0.2)
    return folder


def qwen3_config(
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    tokenizer,
    head_dim: int | None = None,
    tie_word_embeddings: bool = True,
    lm_head_rows: int = 151_936,
    max_position_embeddings: int = 4096,
):
    """A Qwen3 config of the given shape with the tokenizer's special ids (no weights)."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=max(lm_head_rows, len(tokenizer)),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim or hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
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
    config = qwen3_config(
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        tokenizer=tokenizer,
        tie_word_embeddings=tie_word_embeddings,
        lm_head_rows=lm_head_rows,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    set_generation_defaults(model, tokenizer)
    return _save(model, tokenizer, out_dir)


def qwen3_vl_config_and_processor(
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    tokenizer,
    vision_depth: int,
    vision_hidden_size: int,
    vision_intermediate_size: int | None = None,
    vision_heads: int = 2,
    deepstack: list[int] | None = None,
    num_position_embeddings: int = 64,
    head_dim: int | None = None,
    tie_word_embeddings: bool = True,
    min_pixels: int = 32 * 32,
    max_pixels: int = 128 * 128,
    lm_head_rows: int = 151_936,
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
            vocab_size=max(lm_head_rows, len(tokenizer)),
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=head_dim,
            max_position_embeddings=4096,
            tie_word_embeddings=tie_word_embeddings,
            rope_scaling={"rope_type": "default", "mrope_section": section, "mrope_interleaved": True},
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            depth=vision_depth,
            hidden_size=vision_hidden_size,
            intermediate_size=vision_intermediate_size or 2 * vision_hidden_size,
            num_heads=vision_heads,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=hidden_size,
            num_position_embeddings=num_position_embeddings,
            deepstack_visual_indexes=deepstack if deepstack is not None else list(range(min(2, vision_depth))),
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings,
    )
    image_processor = Qwen2VLImageProcessor(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
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
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        tokenizer=tokenizer,
        vision_depth=vision_depth,
        vision_hidden_size=vision_hidden_size,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        lm_head_rows=lm_head_rows,
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    set_generation_defaults(model, tokenizer)
    return _save(model, processor, out_dir)


def set_generation_defaults(model, tokenizer) -> None:
    gen = model.generation_config
    gen.eos_token_id = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    gen.pad_token_id = tokenizer.pad_token_id
    gen.do_sample, gen.temperature, gen.top_p, gen.top_k = True, 1.0, 1.0, 0


def _save(model, processing, out_dir) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model_folder(model, processing, out)
    logger.info(
        "saved %s (%.2f M parameters) to %s",
        type(model).__name__,
        sum(p.numel() for p in model.parameters()) / 1e6,
        out,
    )
    return out
