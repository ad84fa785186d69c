"""A record's images (docs/design.md §3.1): which ones a prompt shows, in the processor's order,
and how each is read: paths resolved and confined to the allowed roots, embedded bytes decoded,
every failure a DatasetError naming the record."""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dopd_vl.data.image_roots import ImageRoots, image_roots
from dopd_vl.errors import DatasetError

__all__ = ["image_parts", "load_image", "resolve_image_path", "is_pil"]


def is_pil(value) -> bool:
    from PIL import Image

    return isinstance(value, Image.Image)


def image_parts(record: dict) -> Iterable[Any]:
    """Images of a record in prompt order (the order the processor sees them): a path string for
    `{"type": "image", "image": path}`, else the next embedded image of `record["images"]`."""
    embedded = iter(record.get("images") or [])
    for message in record["prompt"]:
        if isinstance(message["content"], list):
            for part in message["content"]:
                if part.get("type") == "image":
                    yield part["image"] if part.get("image") is not None else next(embedded)


def load_image(ref: Any, root: str | Path | ImageRoots | None, record: str, field: str = "prompt.image"):
    """An RGB PIL image from a path (resolved and confined by `root`, see `resolve_image_path`), a
    PIL image or {bytes, path}; decoded
    now, so a missing, unreadable or truncated image is a DatasetError naming the record."""
    from PIL import Image, UnidentifiedImageError

    if is_pil(ref):
        return ref.convert("RGB")
    if isinstance(ref, dict) and ref.get("bytes") is not None:
        source, label = io.BytesIO(ref["bytes"]), f"embedded image {ref.get('path') or ''}".strip()
    else:
        path = resolve_image_path(root, ref["path"] if isinstance(ref, dict) else ref, record)
        source, label = path, str(path)
    try:
        with Image.open(source) as img:
            img.load()  # decode now: a truncated file fails here, not inside the processor
            return img.convert("RGB")
    except FileNotFoundError as err:
        raise DatasetError(f"image not found: {label}", record=record, field=field) from err
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DatasetError(f"unreadable image {label}: {err}", record=record, field=field) from err


def resolve_image_path(root: str | Path | ImageRoots | None, image: str, record: str) -> Path:
    """An image's real path: relative paths resolve against the dataset's folder, and the result,
    symlinks resolved, must lie inside the allowed roots (`dopd_vl.data.image_roots`, docs/design.md §3.1);
    outside them is an `ImageOutsideRoots` error naming the record. Pass an `ImageRoots` when
    resolving many paths: a plain folder reads the trusted-roots file on every call."""
    return image_roots(root).resolve(image, record)
