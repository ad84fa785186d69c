"""Which adapter turns a model's processing object into inputs: the registry and `make_adapter`.

Registered adapters (CONTRIBUTING.md) are tried first, newest first, then the built-in vision
adapter (a processor with an image processor: Qwen3-VL) and the text adapter (a tokenizer).
"""

from __future__ import annotations

from pathlib import Path

from dopd_vl.data.image_roots import ImageRoots
from dopd_vl.modality.prompts import PromptConfig
from dopd_vl.modality.text import TextAdapter
from dopd_vl.modality.vision import VisionAdapter

__all__ = ["make_adapter", "register_adapter"]

_ADAPTERS: list[tuple[str, object, object]] = []  # (name, matches(processing), factory(processing, config, image_root))


def register_adapter(name: str, matches, factory) -> None:
    """A modality adapter for the processing objects `matches` accepts; registered adapters are
    tried before the built-in vision and text ones, newest first (CONTRIBUTING.md)."""
    _ADAPTERS[:] = [a for a in _ADAPTERS if a[0] != name]
    _ADAPTERS.insert(0, (name, matches, factory))


def make_adapter(processing, config: PromptConfig | None = None, image_root: str | Path | ImageRoots | None = None):
    """The adapter for a tokenizer (text models) or a processor with an image processor (Qwen3-VL),
    unless a registered adapter claims the processing object first. `image_root`: the dataset's
    folder or its `ImageRoots` (where image paths may lead, docs/design.md §3.1)."""
    config = config or PromptConfig()
    for _, matches, factory in _ADAPTERS:
        if matches(processing):
            return factory(processing, config, image_root)
    if hasattr(processing, "image_processor"):
        return VisionAdapter(processing, config, image_root)
    return TextAdapter(processing, config)
