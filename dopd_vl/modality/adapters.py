"""Adapters turn records into one model's inputs per view: the `Adapter` protocol, the registry
and `make_adapter`.

Registered adapters (CONTRIBUTING.md) are tried first, newest first, then the built-in vision
adapter (a processor with an image processor: Qwen3-VL) and the text adapter (a tokenizer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from dopd_vl.data.image_roots import ImageRoots
from dopd_vl.errors import ConfigError
from dopd_vl.modality.prompts import PromptConfig, PromptInputs
from dopd_vl.modality.text import TextAdapter
from dopd_vl.modality.vision import VisionAdapter
from dopd_vl.models.loading import is_vision_processing

__all__ = ["Adapter", "ImageAdapter", "make_adapter", "register_adapter"]


@runtime_checkable
class Adapter(Protocol):
    """Records -> one model's prompt inputs per view (docs/design.md §3); the only modality code."""

    tokenizer: Any
    config: PromptConfig
    pad_token_id: int

    def prompt(self, record: dict, view: str) -> PromptInputs:
        """The view's prompt: token ids (image tokens included) and the model's extra inputs."""
        ...


@runtime_checkable
class ImageAdapter(Adapter, Protocol):
    """An adapter whose prompts show images (Qwen3-VL): what a view shows, for engines that take
    images beside the token ids (vLLM's multi-modal data)."""

    def view_images(self, record: dict, messages: list[dict]) -> list:
        """The images of a view's messages, in order (crops cut), as the processor receives them."""
        ...


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
    for name, matches, factory in _ADAPTERS:
        if matches(processing):
            adapter = factory(processing, config, image_root)
            if not isinstance(adapter, Adapter):
                raise ConfigError(
                    f"adapter {name!r} built a {type(adapter).__name__}, which lacks the Adapter protocol "
                    "(tokenizer, config, pad_token_id, prompt(record, view)): CONTRIBUTING.md"
                )
            return adapter
    if is_vision_processing(processing):
        return VisionAdapter(processing, config, image_root)
    return TextAdapter(processing, config)
