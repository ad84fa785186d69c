"""Privileged dataset builders: detections and worked solutions -> records (docs/design.md §3.2).

The public API is what this package exports (docs/design.md §5), resolved on first use like
`dopd_vl`'s: `from data_builders import build_grounding, build_hints, load_annotations, ...`.
`formats/` holds one reader per annotation file format (COCO, YOLO, Pascal VOC, Hugging Face
detection datasets) behind `load_annotations`; `privileged` holds the privileged-context formats
(how p is written) and their registry.
"""

from __future__ import annotations

import importlib

_EXPORTS: dict[str, tuple[str, ...]] = {
    "data_builders.privileged": (
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
    ),
    "data_builders.grounding": (
        "AnnotatedImage",
        "load_annotations",
        "load_hf_detections",
        "annotated_image_from_detections",
        "synthesize_questions",
        "build_grounding",
    ),
    "data_builders.hints": ("HintGenerator", "parse_solution", "make_hints", "find_leaks", "build_hints", "STYLES"),
    "data_builders.output": ("BuildReport", "write_jsonl_atomic", "write_dataset_atomic"),
    "data_builders.synthetic": ("make_scene", "write_shape_scenes", "write_arithmetic_problems"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'data_builders' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
