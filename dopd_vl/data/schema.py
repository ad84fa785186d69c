"""The record schema (docs/design.md §3.1): one validator used by the engine and by every builder.

A record:
    id                  non-empty string, unique in its dataset
    prompt              chat messages; content is a string or a list of parts
                        {"type": "text", "text": ...} / {"type": "image", "image": path} /
                        {"type": "image"} (embedded: filled from `images` in order)
    privileged_context  the rendered privileged context p (required by the privileged views only):
                        text, or a list of parts {"type": "text", "text": ...} /
                        {"type": "image", "crop": [x1, y1, x2, y2], "image_index": k} (a crop,
                        in pixels, of the prompt's k-th image, default 0: e.g. the `crop` format)
    privileged          structured source of p (provenance, diagnostics, leak checks), optional;
                        grounding: {format, image_size, objects: [{label, bbox_px, score?}]},
                        score a detector's confidence in [0, 1]
    answer              reference for evaluation only, optional
    meta                free-form dict, optional
    images              embedded images for the path-less image parts, in order (TRL's vision
                        convention): PIL images or {"bytes", "path"} dicts, decoded when used
"""

from __future__ import annotations

import math
from typing import Any

from dopd_vl.data.images import is_pil
from dopd_vl.errors import DatasetError

__all__ = ["RECORD_FIELDS", "validate_record", "record_id", "context_text"]

RECORD_FIELDS = ("id", "prompt", "privileged_context", "privileged", "answer", "meta", "images")
_ROLES = ("system", "user", "assistant")


def record_id(record: Any, index: int | None = None) -> str:
    """The record's id if it has a usable one, else its position (for error messages)."""
    if isinstance(record, dict) and isinstance(record.get("id"), str) and record["id"]:
        return record["id"]
    return f"#{index}" if index is not None else "?"


def validate_record(record: Any, *, file: str | None = None, index: int | None = None) -> None:
    """Raise DatasetError naming file, record and field for the first schema violation."""
    rid = record_id(record, index)

    def fail(field: str, message: str) -> None:
        raise DatasetError(message, file=file, record=rid, field=field)

    if not isinstance(record, dict):
        fail("<record>", f"a record must be a JSON object, got {type(record).__name__}")
    unknown = set(record) - set(RECORD_FIELDS)
    if unknown:
        fail(sorted(unknown)[0], f"unknown field(s) {sorted(unknown)}; valid fields: {list(RECORD_FIELDS)}")
    if not isinstance(record.get("id"), str) or not record["id"]:
        fail("id", "missing or empty id (a non-empty string)")
    prompt = record.get("prompt")
    if not isinstance(prompt, list) or not prompt:
        fail("prompt", "prompt must be a non-empty list of chat messages")
    embedded = 0
    for m, message in enumerate(prompt):
        where = f"prompt[{m}]"
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            fail(f"{where}.role", f"each message needs a role in {_ROLES}")
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list) or not content:
            fail(f"{where}.content", "content must be a string or a non-empty list of parts")
        for p, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                continue
            if kind == "image" and isinstance(part.get("image"), str) and part["image"]:
                continue
            if kind == "image" and part.get("image") is None:
                embedded += 1
                continue
            fail(
                f"{where}.content[{p}]",
                'each part must be {"type": "text", "text": str}, {"type": "image", "image": path} or '
                '{"type": "image"} with `images`',
            )
    if not any(m["role"] == "user" for m in prompt):
        fail("prompt", "prompt has no user message")
    if prompt[-1]["role"] != "user":
        fail("prompt", "the last message must be the user's (the response is the assistant's turn)")
    _validate_context(record.get("privileged_context"), embedded + _path_images(prompt), fail)
    for field, kinds in (
        ("privileged", (dict,)),
        ("answer", (str, int, float)),
        ("meta", (dict,)),
        ("images", (list,)),
    ):
        if record.get(field) is not None and not isinstance(record[field], kinds):
            fail(
                field,
                f"{field} must be of type {'/'.join(k.__name__ for k in kinds)}, got {type(record[field]).__name__}",
            )
    _validate_scores(record.get("privileged"), fail)
    images = record.get("images") or []
    if len(images) != embedded:
        fail(
            "images",
            f"{embedded} image part(s) without a path but {len(images)} embedded image(s): they fill the parts in "
            f"order",
        )
    for k, image in enumerate(images):
        if not (
            is_pil(image)
            or (
                isinstance(image, dict)
                and (isinstance(image.get("bytes"), bytes) or isinstance(image.get("path"), str))
            )
        ):
            fail(
                f"images[{k}]", f"an embedded image must be a PIL image or {{bytes, path}}, got {type(image).__name__}"
            )


def _validate_scores(privileged: Any, fail) -> None:
    """privileged.objects[*].score (a detector's confidence): absent, or a finite number in [0, 1]."""
    objects = privileged.get("objects") if isinstance(privileged, dict) else None
    for k, obj in enumerate(objects if isinstance(objects, list) else []):
        if not isinstance(obj, dict) or "score" not in obj:
            continue
        score = obj["score"]
        if (
            isinstance(score, bool)
            or not isinstance(score, (int, float))
            or not math.isfinite(score)
            or not (0.0 <= score <= 1.0)
        ):
            fail(f"privileged.objects[{k}].score", f"a box's score must be a finite number in [0, 1], got {score!r}")


def _path_images(prompt: list) -> int:
    return sum(
        1
        for m in prompt
        if isinstance(m["content"], list)
        for p in m["content"]
        if p.get("type") == "image" and p.get("image") is not None
    )


def _validate_context(context: Any, num_images: int, fail) -> None:
    """privileged_context: a string, or parts (text, and crops of the prompt's images)."""
    if context is None or isinstance(context, str):
        return
    if not isinstance(context, list) or not context:
        fail(
            "privileged_context",
            f"privileged_context must be a string or a non-empty list of parts, got {type(context).__name__}",
        )
    for k, part in enumerate(context):
        where = f"privileged_context[{k}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str) and set(part) <= {"type", "text"}:
            continue
        if kind != "image" or not set(part) <= {"type", "crop", "image_index"}:
            fail(
                where,
                'each part must be {"type": "text", "text": str} or '
                '{"type": "image", "crop": [x1, y1, x2, y2], "image_index": k}',
            )
        crop, index = part.get("crop"), part.get("image_index", 0)
        if not (
            isinstance(crop, list)
            and len(crop) == 4
            and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in crop)
            and 0 <= crop[0] < crop[2]
            and 0 <= crop[1] < crop[3]
        ):
            fail(
                f"{where}.crop",
                f"crop must be [x1, y1, x2, y2] in pixels with 0 <= x1 < x2, 0 <= y1 < y2, got {crop!r}",
            )
        if not (isinstance(index, int) and not isinstance(index, bool) and 0 <= index < num_images):
            fail(
                f"{where}.image_index",
                f"image_index must name one of the prompt's {num_images} image(s), got {index!r}",
            )


def context_text(context: str | list | None) -> str:
    """The privileged context as text (image parts as a placeholder): for pages, logs, leak checks."""
    if context is None or isinstance(context, str):
        return context or ""
    return "\n".join(
        p["text"] if p["type"] == "text" else f"<image: crop {p['crop']} of prompt image {p.get('image_index', 0)}>"
        for p in context
    )
