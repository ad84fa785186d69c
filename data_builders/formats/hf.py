"""Hugging Face detection datasets (docs/design.md §3.2): an image column and an `objects` column
with `bbox` and `category` (the transformers object-detection convention), from any datasets
source; each row goes through `sv.Detections` like a detector's output."""

from __future__ import annotations

import math
from pathlib import Path

from data_builders.formats.annotations import (
    AnnotatedImage,
    AnnotationLoader,
    confined,
    finish_load,
    from_detections,
    image_size,
)
from data_builders.output import BuildReport, check_on_error
from dopd_vl.errors import DatasetError

__all__ = ["BBOX_FORMATS", "load_hf_detections"]

BBOX_FORMATS = ("coco", "pascal_voc", "yolo")


def load_hf_detections(
    source: str | Path,
    *,
    split: str = "train",
    bbox_format: str = "coco",
    normalized: bool = False,
    image_column: str = "image",
    objects_column: str = "objects",
    on_error: str = "fail",
    degenerate: str = "drop",
    report: BuildReport | None = None,
) -> list[AnnotatedImage]:
    """A Hugging Face detection dataset (an image column and an `objects` column with `bbox` and
    `category`, the transformers object-detection convention) -> AnnotatedImages.

    Boxes are `coco` [x, y, w, h], `pascal_voc` [x1, y1, x2, y2] (pixels, or 0-1 with
    `normalized`) or `yolo` [x_center, y_center, w, h] (always 0-1); category names come from the
    dataset's ClassLabel feature (or are the values themselves, when strings). Each row goes
    through `sv.Detections` like a detector's output, with the same validation, skip mode and
    degenerate-box policy as the file formats.
    """
    from dopd_vl.data.sources import _open_dataset, _undecoded_images, records_root

    check_on_error(on_error)
    if bbox_format not in BBOX_FORMATS:
        raise ValueError(f"bbox_format must be one of {BBOX_FORMATS}, got {bbox_format!r}")
    name = str(source)
    dataset = _open_dataset(source, split)
    for column in (image_column, objects_column):
        if column not in dataset.column_names:
            raise DatasetError(
                f"missing column {column!r}; the dataset has {dataset.column_names}", file=name, field=column
            )
    names = _class_names(dataset.features[objects_column])
    dataset = (
        _undecoded_images(dataset, image_column)
        if hasattr(dataset.features[image_column], "feature")
        else _undecoded_image(dataset, image_column)
    )
    loader = AnnotationLoader(on_error, degenerate, report if report is not None else BuildReport())
    root = records_root(source)  # relative image paths in the dataset resolve here, confined to it
    for index in range(len(dataset)):
        record = f"row {index}"

        def build(index=index, record=record) -> AnnotatedImage:
            row = dataset[index]
            path, data = _row_image(row.get(image_column), root, name, record, image_column)
            size = image_size(path if data is None else data, source=name, record=record)
            boxes, labels = _row_objects(row.get(objects_column), names, name, record, objects_column)
            xyxy = [
                _to_xyxy(b, bbox_format, normalized, size, name, f"{record} object {k}") for k, b in enumerate(boxes)
            ]
            return from_detections(path, data, size, xyxy, labels, name, record, loader)

        loader.add(name, record, build)
    return finish_load(loader, name)


def _class_names(feature) -> list[str] | None:
    """ClassLabel names of the objects' category (dict-of-lists or list-of-dicts layouts)."""
    import datasets

    inner = feature.feature if hasattr(feature, "feature") else feature
    category = inner.get("category") if isinstance(inner, dict) else None
    category = getattr(category, "feature", category)
    return list(category.names) if isinstance(category, datasets.ClassLabel) else None


def _undecoded_image(dataset, column: str):
    import datasets

    feature = dataset.features[column]
    if isinstance(feature, datasets.Image) and feature.decode:
        return dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def _row_image(value, root: Path | None, source: str, record: str, field: str) -> tuple[Path, bytes | None]:
    """(path, None) for an image with a local file, else (a name, its bytes). A string path is
    relative to the dataset's folder and may not leave it (like annotation paths)."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, str):
        if root is None:
            raise DatasetError(
                f"image path {value!r} but the dataset has no local folder to resolve it against",
                file=source,
                record=record,
                field=field,
            )
        return confined(root, value, file=source, record=record, field=field), None
    if isinstance(value, dict):
        path = value.get("path")
        if isinstance(path, str) and Path(path).is_file():
            return Path(path).resolve(), None
        if isinstance(value.get("bytes"), bytes):
            return Path(Path(path).name if isinstance(path, str) and path else f"{record.replace(' ', '')}.png"), value[
                "bytes"
            ]
    raise DatasetError(
        f"no image (expected an Image feature, got {type(value).__name__})", file=source, record=record, field=field
    )


def _row_objects(value, names: list[str] | None, source: str, record: str, field: str) -> tuple[list, list[str]]:
    if isinstance(value, dict):  # {"bbox": [...], "category": [...]}
        boxes, categories = value.get("bbox"), value.get("category")
    elif isinstance(value, list):  # [{"bbox": ..., "category": ...}, ...]
        if not all(isinstance(o, dict) for o in value):
            raise DatasetError("objects must be dicts with bbox and category", file=source, record=record, field=field)
        boxes, categories = [o.get("bbox") for o in value], [o.get("category") for o in value]
    else:
        raise DatasetError(
            f"objects must hold bbox and category lists, got {type(value).__name__}",
            file=source,
            record=record,
            field=field,
        )
    if not isinstance(boxes, list) or not isinstance(categories, list) or len(boxes) != len(categories):
        raise DatasetError(
            "objects need equally long bbox and category lists", file=source, record=record, field=f"{field}.bbox"
        )
    labels = []
    for k, c in enumerate(categories):
        if isinstance(c, str) and c:
            labels.append(c)
        elif isinstance(c, int) and not isinstance(c, bool) and names is not None and 0 <= c < len(names):
            labels.append(names[c])
        else:
            raise DatasetError(
                f"category {c!r} has no name (the category feature must be a ClassLabel, or strings)",
                file=source,
                record=f"{record} object {k}",
                field=f"{field}.category",
            )
    return boxes, labels


def _to_xyxy(box, bbox_format: str, normalized: bool, size: tuple[int, int], source: str, record: str) -> list[float]:
    if not (
        isinstance(box, (list, tuple))
        and len(box) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
    ):
        raise DatasetError(f"bbox must be 4 numbers, got {box!r}", file=source, record=record, field="bbox")
    if not all(math.isfinite(v) for v in box):
        raise DatasetError(f"non-finite box value in {list(box)}", file=source, record=record, field="bbox")
    W, H = size
    sx, sy = (W, H) if normalized or bbox_format == "yolo" else (1.0, 1.0)
    a, b, c, d = box
    if bbox_format == "coco":
        return [a * sx, b * sy, (a + c) * sx, (b + d) * sy]
    if bbox_format == "pascal_voc":
        return [a * sx, b * sy, c * sx, d * sy]
    return [(a - c / 2) * sx, (b - d / 2) * sy, (a + c / 2) * sx, (b + d / 2) * sy]
