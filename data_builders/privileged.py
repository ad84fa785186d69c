"""How privileged information p is rendered (docs/design.md §3.2).

A format is anything with a `name` and `render(privileged: dict) -> str | list[dict]`: text, or a
list of parts (text and image crops of the prompt's image, e.g. `crop`). Builders store the
structured source in the record's `privileged` field and the rendered context in
`privileged_context`, which is exactly what both privileged views see.

The structured source of grounding formats keeps exact pixel boxes, so every format renders from
the same data:

    {"format": NAME, "image_size": [W, H], "objects": [{"label": "bowl", "bbox_px": [x1, y1, x2, y2]}]}

Hints use {"format": NAME, "hints": ["...", ...]}.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from dopd_vl.errors import ConfigError

__all__ = [
    "PrivilegedFormat",
    "register_format",
    "get_format",
    "available_formats",
    "GroundingFormat",
    "Qwen3VLGrounding",
    "Qwen25VLGrounding",
    "Qwen3VLScoredGrounding",
    "NumberedHints",
    "CropFormat",
    "qwen3vl_box",
    "qwen25vl_box",
]


@runtime_checkable
class PrivilegedFormat(Protocol):
    name: str

    def render(self, privileged: dict) -> str | list[dict]: ...


_REGISTRY: dict[str, PrivilegedFormat] = {}


def register_format(fmt: PrivilegedFormat, *, overwrite: bool = False) -> PrivilegedFormat:
    """Make a format findable by name (builders, the CLI's --privileged-format)."""
    if not isinstance(fmt, PrivilegedFormat) or not isinstance(fmt.name, str) or not fmt.name:
        raise TypeError("a privileged format needs a non-empty `name` and a `render(privileged) -> str` method")
    if fmt.name in _REGISTRY and not overwrite and _REGISTRY[fmt.name] is not fmt:
        raise ValueError(
            f"a privileged format named {fmt.name!r} is already registered (pass overwrite=True to replace it)"
        )
    _REGISTRY[fmt.name] = fmt
    return fmt


def get_format(name: str) -> PrivilegedFormat:
    """A registered format by name, or `package.module:attr` (imported, instantiated if a class)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"cannot import privileged format {name!r}: {err}") from err
        fmt = obj() if isinstance(obj, type) else obj
        return register_format(fmt, overwrite=True)
    raise ConfigError(f"unknown privileged format {name!r}; registered: {available_formats()} (or give module:attr)")


def available_formats() -> list[str]:
    return sorted(_REGISTRY)


# ------------------------------------------------------------------------------------ grounding
def qwen3vl_box(box_px: list[float], image_size: list[int]) -> list[int]:
    """Qwen3-VL grounding: round(coord / size * 1000) clamped to 0..1000, xyxy."""
    w, h = image_size
    scale = (w, h, w, h)
    return [min(1000, max(0, round(c / s * 1000))) for c, s in zip(box_px, scale)]


def qwen25vl_box(
    box_px: list[float],
    image_size: list[int],
    patch_size: int = 14,
    merge_size: int = 2,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> list[int]:
    """Qwen2.5-VL grounding: absolute pixels of the image as its processor resizes it."""
    from qwen_vl_utils import smart_resize

    w, h = image_size
    new_h, new_w = smart_resize(h, w, factor=patch_size * merge_size, min_pixels=min_pixels, max_pixels=max_pixels)
    scale = (new_w / w, new_h / h, new_w / w, new_h / h)
    limits = (new_w, new_h, new_w, new_h)
    return [min(lim, max(0, round(c * s))) for c, s, lim in zip(box_px, scale, limits)]


@dataclass(frozen=True)
class GroundingFormat:
    """Boxes with labels as a JSON list of {"bbox_2d": [x1, y1, x2, y2], "label": name}; with
    `scores`, each box also carries its detector confidence {"score": 0.87} (two decimals; boxes
    without one, ground truth, get none)."""

    name: str
    lead_in: str
    convert: Callable[[list[float], list[int]], list[int]]  # (pixel box, image size) -> format coordinates
    scores: bool = False

    def boxes(self, privileged: dict) -> list[dict]:
        size = privileged["image_size"]
        boxes = []
        for o in privileged["objects"]:
            box = {"bbox_2d": self.convert(o["bbox_px"], size), "label": o["label"]}
            if self.scores and o.get("score") is not None:
                box["score"] = round(float(o["score"]), 2)
            boxes.append(box)
        return boxes

    def render(self, privileged: dict) -> str:
        return self.lead_in + json.dumps(self.boxes(privileged), ensure_ascii=False)


# Qwen3-VL's native form [paper: boxes with labels were best]; Qwen2.5-VL's absolute pixels.
Qwen3VLGrounding = GroundingFormat(
    "qwen3vl_grounding", "Relevant objects (bbox_2d in 0-1000 coordinates): ", qwen3vl_box
)
Qwen25VLGrounding = GroundingFormat(
    "qwen25vl_grounding", "Relevant objects (bbox_2d in pixels of the resized image): ", qwen25vl_box
)
# A detector's boxes with their confidence, so the teacher can weigh a 0.95 box against a 0.3 one [ours].
Qwen3VLScoredGrounding = GroundingFormat(
    "qwen3vl_grounding_scored",
    "Detected objects (bbox_2d in 0-1000 coordinates; score: the detector's confidence, 0-1): ",
    qwen3vl_box,
    scores=True,
)


@dataclass(frozen=True)
class CropFormat:
    """Vision-OPD's privileged input: an evidence-centred crop of the image, the union of the
    record's boxes grown by `margin` of its size on each side (clamped to the image), shown after
    the original image. The pixels are cut by the vision adapter when the view is built."""

    name: str = "crop"
    margin: float = 0.25
    lead_in: str = "A zoomed-in view of the relevant region:"

    def crop_box(self, privileged: dict) -> list[int]:
        if "image_size" not in privileged or "objects" not in privileged:
            raise ValueError(f"format {self.name!r} renders grounding sources (image_size and objects with bbox_px)")
        w, h = privileged["image_size"]
        boxes = [o["bbox_px"] for o in privileged["objects"]] or [[0, 0, w, h]]
        x1, y1 = min(b[0] for b in boxes), min(b[1] for b in boxes)
        x2, y2 = max(b[2] for b in boxes), max(b[3] for b in boxes)
        dx, dy = self.margin * (x2 - x1), self.margin * (y2 - y1)
        return [
            max(0, math.floor(x1 - dx)),
            max(0, math.floor(y1 - dy)),
            min(w, math.ceil(x2 + dx)),
            min(h, math.ceil(y2 + dy)),
        ]

    def render(self, privileged: dict) -> list[dict]:
        return [{"type": "text", "text": self.lead_in}, {"type": "image", "crop": self.crop_box(privileged)}]


# ---------------------------------------------------------------------------------------- hints
class NumberedHints:
    """One numbered line per hint [paper: step-wise hints without execution were best]."""

    name = "hints"
    lead_in = "Hints:"

    def render(self, privileged: dict) -> str:
        return "\n".join([self.lead_in] + [f"{i}. {h}" for i, h in enumerate(privileged["hints"], start=1)])


for _fmt in (Qwen3VLGrounding, Qwen25VLGrounding, Qwen3VLScoredGrounding, CropFormat(), NumberedHints()):
    register_format(_fmt)
