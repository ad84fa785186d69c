"""Privileged grounding datasets from detection annotations (docs/design.md §3.2).

COCO JSON, YOLO label folders and Pascal VOC XML are parsed by our own validators, which name the
file, record and field of every fault and apply one policy to all of them (`on_error` fail / skip
the image, `degenerate` drop / keep / fail for zero-area boxes); the boxes follow supervision's
conventions for each format. supervision's own file loaders are not used: they accept several
faults we reject (e.g. swapped VOC corners) and cannot skip one bad record. `sv.Detections` from a
detector enter through `annotated_image_from_detections`. Classes are keyed by name everywhere,
because supervision renumbers VOC classes.

Questions come from a QA file or are synthesised with verifiable answers: counting, existence
(negatives use labels absent from the image) and left/right relations between two objects that
occur once. Attached boxes are the query-related ones (objects whose label the question names or
the given labels, else all objects) unless `objects="all"`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from data_builders.formats import get_format
from data_builders.output import BuildReport, check_on_error, finish_build
from dopd_vl.errors import DatasetError

logger = logging.getLogger(__name__)

__all__ = [
    "AnnotatedImage",
    "load_annotations",
    "load_hf_detections",
    "annotated_image_from_detections",
    "synthesize_questions",
    "build_grounding",
    "pluralize",
]

IMAGE_EXTENSIONS = (".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp")
OUTSIDE_TOLERANCE = 0.02  # boxes may overhang the image by 2% of its size (annotation rounding); more is an error
_IRREGULAR_PLURALS = {"person": "people", "broccoli": "broccoli", "mouse": "mice", "knife": "knives", "sheep": "sheep", "skis": "skis", "scissors": "scissors", "bus": "buses", "glass": "glasses", "bench": "benches", "couch": "couches", "sandwich": "sandwiches", "toothbrush": "toothbrushes", "wine glass": "wine glasses"}


@dataclass
class AnnotatedImage:
    """One image with its objects in exact pixel coordinates (xyxy)."""

    image: Path  # absolute (for an image known only by its bytes: a name, with `data` set)
    image_size: tuple[int, int]  # (W, H)
    objects: list[dict]  # {"label": str, "bbox_px": [x1, y1, x2, y2]}, in reading order
    source: str  # the annotation file
    data: bytes | None = None  # the encoded image, when it has no local file (datasets sources)

    @property
    def key(self) -> str:
        return self.image.stem


def pluralize(label: str) -> str:
    if label in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[label]
    if label.endswith(("s", "x", "ch", "sh")):
        return label + "es"
    if label.endswith("y") and label[-2:-1] not in "aeiou":
        return label[:-1] + "ies"
    return label + "s"


# ------------------------------------------------------------------------------------- loading
DEGENERATE = ("drop", "keep", "fail")


def load_annotations(
    fmt: str,
    images: str | Path,
    annotations: str | Path,
    classes: str | Path | None = None,
    *,
    on_error: str = "fail",
    degenerate: str = "drop",
    report: BuildReport | None = None,
) -> list[AnnotatedImage]:
    """Validate and load a detection dataset; every image is opened and decoded once.

    Every fault is a DatasetError naming file, record and field. With `on_error="skip"` an image
    with any fault (in the image, its entry or one of its annotations) is left out whole and listed
    in `report.skipped` (written to OUT.skipped.jsonl by the builder); faults of the file as a whole
    (unparseable JSON, no category list) still stop the build. Boxes of zero width or height are
    `degenerate`: dropped and counted (default), kept, or an error; negative extents (swapped
    corners), non-finite values and boxes outside the image stay errors.

    Our validators parse every field, so they also produce the boxes, with supervision's
    conventions (COCO xywh; YOLO normalised centres; VOC 1-based inclusive corners, x1 - 1): a
    file loader cannot skip one bad annotation, it accepts or rejects the whole file.
    """
    check_on_error(on_error)
    if degenerate not in DEGENERATE:
        raise ValueError(f"degenerate must be one of {DEGENERATE}, got {degenerate!r}")
    images = Path(images)
    if not images.is_dir():
        raise DatasetError("images folder not found", file=str(images))
    annotations = Path(annotations)
    if not annotations.exists():
        raise DatasetError("annotations not found", file=str(annotations))
    loader = _Loader(on_error, degenerate, report if report is not None else BuildReport())
    if fmt == "coco":
        _load_coco(loader, images, annotations)
    elif fmt == "yolo":
        _load_yolo(loader, images, annotations, classes)
    elif fmt == "voc":
        _load_voc(loader, images, annotations)
    else:
        raise ValueError(f"unknown annotation format {fmt!r}; expected coco, yolo or voc")
    if not loader.images:
        reasons = f" ({len(loader.report.skipped)} skipped; first: {loader.report.skipped[0]['reason']})" if loader.report.skipped else ""
        raise DatasetError(f"the dataset is empty: no usable image{reasons}", file=str(annotations))
    return sorted(loader.images, key=lambda img: str(img.image))


def annotated_image_from_detections(image: str | Path, detections, class_names: list[str] | dict[int, str], source: str = "detections",
                                    degenerate: str = "drop", report: BuildReport | None = None) -> AnnotatedImage:
    """An `sv.Detections` (e.g. a detector's output) for one image -> AnnotatedImage.

    `class_names[class_id]` names each detection; boxes are the detections' xyxy pixels.
    """
    loader = _Loader("fail", degenerate, report if report is not None else BuildReport())
    path = Path(image).resolve()
    size = _image_size(path, source=source, record=path.name)
    labels = []
    for i, class_id in enumerate(detections.class_id):
        try:
            labels.append(class_names[int(class_id)])
        except (IndexError, KeyError) as err:
            raise DatasetError(f"class id {int(class_id)} has no name", file=source, record=f"{path.name} detection {i}", field="class_id") from err
    return _checked_image(path, None, size, detections.xyxy, labels, source, f"{path.name} detection", "xyxy", loader)


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
    from dopd_vl.data import _open_dataset, _undecoded_images, records_root

    check_on_error(on_error)
    if bbox_format not in BBOX_FORMATS:
        raise ValueError(f"bbox_format must be one of {BBOX_FORMATS}, got {bbox_format!r}")
    name = str(source)
    dataset = _open_dataset(source, split)
    for column in (image_column, objects_column):
        if column not in dataset.column_names:
            raise DatasetError(f"missing column {column!r}; the dataset has {dataset.column_names}", file=name, field=column)
    names = _class_names(dataset.features[objects_column])
    dataset = _undecoded_images(dataset, image_column) if hasattr(dataset.features[image_column], "feature") else _undecoded_image(dataset, image_column)
    loader = _Loader(on_error, degenerate, report if report is not None else BuildReport())
    root = records_root(source)  # relative image paths in the dataset resolve here, confined to it
    for index in range(len(dataset)):
        record = f"row {index}"

        def build(index=index, record=record) -> AnnotatedImage:
            row = dataset[index]
            path, data = _row_image(row.get(image_column), root, name, record, image_column)
            size = _image_size(path if data is None else data, source=name, record=record)
            boxes, labels = _row_objects(row.get(objects_column), names, name, record, objects_column)
            xyxy = [_to_xyxy(b, bbox_format, normalized, size, name, f"{record} object {k}") for k, b in enumerate(boxes)]
            return _from_detections(path, data, size, xyxy, labels, name, record, loader)

        loader.add(name, record, build)
    if not loader.images:
        reasons = f" ({len(loader.report.skipped)} skipped; first: {loader.report.skipped[0]['reason']})" if loader.report.skipped else ""
        raise DatasetError(f"the dataset is empty: no usable image{reasons}", file=name)
    return loader.images


def _from_detections(path: Path, data: bytes | None, size: tuple[int, int], xyxy: list[list[float]], labels: list[str], source: str, record: str, loader) -> AnnotatedImage:
    """Boxes and labels of one dataset row as an `sv.Detections` (supervision's form of a
    detector's output), then the same path as `annotated_image_from_detections`."""
    import numpy as np

    sv = _supervision()
    classes = sorted(set(labels))
    detections = sv.Detections(xyxy=np.array(xyxy, dtype=float).reshape(-1, 4), class_id=np.array([classes.index(l) for l in labels], dtype=int))
    return _checked_image(path, data, size, detections.xyxy, [classes[int(c)] for c in detections.class_id], source, f"{record} object", "bbox", loader)


def _checked_image(path: Path, data: bytes | None, size: tuple[int, int], xyxy, labels: list[str], source: str, record: str, field: str, loader) -> AnnotatedImage:
    objects = [loader.box(label, [float(v) for v in box], size, file=source, record=f"{record} {k}", field=field) for k, (box, label) in enumerate(zip(xyxy, labels))]
    return AnnotatedImage(path, size, _reading_order([o for o in objects if o is not None]), source, data)


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
            raise DatasetError(f"image path {value!r} but the dataset has no local folder to resolve it against", file=source, record=record, field=field)
        return _confined(root, value, file=source, record=record, field=field), None
    if isinstance(value, dict):
        path = value.get("path")
        if isinstance(path, str) and Path(path).is_file():
            return Path(path).resolve(), None
        if isinstance(value.get("bytes"), bytes):
            return Path(Path(path).name if isinstance(path, str) and path else f"{record.replace(' ', '')}.png"), value["bytes"]
    raise DatasetError(f"no image (expected an Image feature, got {type(value).__name__})", file=source, record=record, field=field)


def _row_objects(value, names: list[str] | None, source: str, record: str, field: str) -> tuple[list, list[str]]:
    if isinstance(value, dict):  # {"bbox": [...], "category": [...]}
        boxes, categories = value.get("bbox"), value.get("category")
    elif isinstance(value, list):  # [{"bbox": ..., "category": ...}, ...]
        if not all(isinstance(o, dict) for o in value):
            raise DatasetError("objects must be dicts with bbox and category", file=source, record=record, field=field)
        boxes, categories = [o.get("bbox") for o in value], [o.get("category") for o in value]
    else:
        raise DatasetError(f"objects must hold bbox and category lists, got {type(value).__name__}", file=source, record=record, field=field)
    if not isinstance(boxes, list) or not isinstance(categories, list) or len(boxes) != len(categories):
        raise DatasetError("objects need equally long bbox and category lists", file=source, record=record, field=f"{field}.bbox")
    labels = []
    for k, c in enumerate(categories):
        if isinstance(c, str) and c:
            labels.append(c)
        elif isinstance(c, int) and not isinstance(c, bool) and names is not None and 0 <= c < len(names):
            labels.append(names[c])
        else:
            raise DatasetError(f"category {c!r} has no name (the category feature must be a ClassLabel, or strings)", file=source, record=f"{record} object {k}", field=f"{field}.category")
    return boxes, labels


def _to_xyxy(box, bbox_format: str, normalized: bool, size: tuple[int, int], source: str, record: str) -> list[float]:
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
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


class _Loader:
    """Collects images under the error and degenerate-box policies."""

    def __init__(self, on_error: str, degenerate: str, report: BuildReport):
        self.on_error, self.degenerate, self.report = on_error, degenerate, report
        self.images: list[AnnotatedImage] = []

    def add(self, file: str, record: str, build) -> None:
        """Run `build()` for one image; a DatasetError fails the load or skips the image."""
        try:
            self.images.append(build())
        except DatasetError as err:
            if self.on_error == "fail":
                raise
            logger.warning("skipped %s: %s", record, err)
            self.report.skipped.append({"id": record, "file": file, "reason": str(err)})

    def fault(self, err: DatasetError) -> None:
        """A fault outside any one image's build (e.g. a broken category entry)."""
        self.add(err.file or "", err.record or "?", lambda: (_ for _ in ()).throw(err))

    def box(self, label: str, box: list, size: tuple[int, int], *, file: str, record: str, field: str) -> dict | None:
        """A checked object in pixel xyxy, or None for a dropped degenerate box (zero width or height)."""
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
            raise DatasetError(f"box values must be numbers, got {box}", file=file, record=record, field=field)
        if not all(math.isfinite(v) for v in box):
            raise DatasetError(f"non-finite box value in {box}", file=file, record=record, field=field)
        W, H = size
        x1, y1, x2, y2 = box
        if x2 < x1 or y2 < y1:
            raise DatasetError(f"box with negative width or height (swapped corners?) {box}", file=file, record=record, field=field)
        mx, my = OUTSIDE_TOLERANCE * W, OUTSIDE_TOLERANCE * H
        if x1 < -mx or y1 < -my or x2 > W + mx or y2 > H + my:
            raise DatasetError(f"box {[round(v, 1) for v in box]} lies outside the {W}x{H} image", file=file, record=record, field=field)
        if x2 == x1 or y2 == y1:
            if self.degenerate == "fail":
                raise DatasetError(f"box of zero width or height {box} (--degenerate drop|keep to accept)", file=file, record=record, field=field)
            self.report.counts[f"degenerate boxes {'dropped' if self.degenerate == 'drop' else 'kept'}"] += 1
            if self.degenerate == "drop":
                return None
        return {"label": label, "bbox_px": _clip([round(float(v), 2) for v in box], size)}


def _load_coco(loader: _Loader, images: Path, annotations: Path) -> None:
    data = _read_json(annotations)
    file = str(annotations)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key) if isinstance(data, dict) else None, list):
            raise DatasetError(f"COCO file has no {key!r} list", file=file, record="<root>", field=key)
    categories = {}
    for c in data["categories"]:
        if not isinstance(c, dict) or not _is_id(c.get("id")) or not isinstance(c.get("name"), str):
            # Not fatal in skip mode: annotations that use it are then "unknown category" faults.
            loader.fault(DatasetError("each category needs an integer id and a name", file=file, record=f"category {c.get('id') if isinstance(c, dict) else c}", field="categories"))
            continue
        categories[c["id"]] = c["name"]
    by_image: dict[int, list] = {}
    orphans = []
    entries = {}
    for entry in data["images"]:
        if isinstance(entry, dict) and _is_id(entry.get("id")) and entry["id"] not in entries:
            entries[entry["id"]] = entry
    for a in data["annotations"]:
        image_id = a.get("image_id") if isinstance(a, dict) else None
        (by_image.setdefault(image_id, []) if _is_id(image_id) and image_id in entries else orphans).append(a)
    seen_ids, seen_names = set(), set()
    for entry in data["images"]:
        rid = f"image id {entry.get('id') if isinstance(entry, dict) else entry}"

        def build(entry=entry, rid=rid) -> AnnotatedImage:
            if not isinstance(entry, dict) or not _is_id(entry.get("id")) or not isinstance(entry.get("file_name"), str):
                raise DatasetError("each image needs an integer id and a file_name", file=file, record=rid, field="images")
            if entry["id"] in seen_ids or entry["file_name"] in seen_names:
                raise DatasetError("duplicate image id or file_name", file=file, record=rid, field="images.id")
            seen_ids.add(entry["id"])
            seen_names.add(entry["file_name"])
            path = _confined(images, entry["file_name"], file=file, record=rid, field="file_name")
            size = _image_size(path, source=file, record=rid)
            declared = (entry.get("width"), entry.get("height"))
            if declared != (None, None) and tuple(declared) != size:
                raise DatasetError(f"declared size {declared} differs from the image's {size}", file=file, record=rid, field="width/height")
            objects = []
            for a in by_image.get(entry["id"], []):
                arid = f"annotation id {a.get('id')}"
                if not _is_id(a.get("category_id")) or a["category_id"] not in categories:
                    raise DatasetError(f"unknown category id {a.get('category_id')!r}", file=file, record=arid, field="category_id")
                bbox = a.get("bbox")
                if not (isinstance(bbox, list) and len(bbox) == 4):
                    raise DatasetError("bbox must be [x, y, width, height] numbers", file=file, record=arid, field="bbox")
                if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
                    raise DatasetError(f"bbox values must be numbers, got {bbox}", file=file, record=arid, field="bbox")
                x, y, w, h = bbox
                objects.append(loader.box(categories[a["category_id"]], [x, y, x + w, y + h], size, file=file, record=arid, field="bbox"))
            # Crowd annotations are kept as boxes, as supervision's loader does.
            return AnnotatedImage(path, size, _reading_order([o for o in objects if o is not None]), file)

        loader.add(file, rid, build)
    for a in orphans:  # after the images, so that an image's own fault is named first
        rid = f"annotation id {a.get('id') if isinstance(a, dict) else a}"
        field = "image_id" if isinstance(a, dict) else "annotations"
        loader.fault(DatasetError(f"unknown image id {a.get('image_id')!r}" if isinstance(a, dict) else "an annotation must be an object", file=file, record=rid, field=field))


def _load_yolo(loader: _Loader, images: Path, labels: Path, classes: str | Path | None) -> None:
    if not labels.is_dir():
        raise DatasetError("YOLO annotations must be the folder of label .txt files", file=str(labels))
    classes_path = Path(classes) if classes else _find_yolo_classes(labels)
    names = _yolo_class_names(classes_path)
    image_files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not image_files:
        raise DatasetError("the dataset is empty: no images", file=str(images))
    for image in image_files:
        label_file = labels / f"{image.stem}.txt"

        def build(image=image, label_file=label_file) -> AnnotatedImage:
            size = _image_size(image, source=str(images), record=image.name)
            objects = []
            try:
                lines = label_file.read_text(encoding="utf-8").splitlines() if label_file.exists() else []
            except UnicodeDecodeError as err:
                raise DatasetError(f"not a text file: {err}", file=str(label_file), record=image.stem, field="labels") from None
            for n, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                fields = line.split()
                rid = f"line {n}"
                if len(fields) != 5:
                    raise DatasetError(f"expected 5 fields (class x_center y_center width height), got {len(fields)}", file=str(label_file), record=rid, field="fields")
                values = {}
                for name, value in zip(("class", "x_center", "y_center", "width", "height"), fields):
                    try:
                        values[name] = float(value)
                    except ValueError:
                        raise DatasetError(f"non-numeric value {value!r}", file=str(label_file), record=rid, field=name) from None
                    if not math.isfinite(values[name]):
                        raise DatasetError(f"non-finite value {value!r}", file=str(label_file), record=rid, field=name)
                if not fields[0].isdigit() or int(fields[0]) >= len(names):
                    raise DatasetError(f"class {fields[0]} out of range (the dataset has {len(names)} classes)", file=str(label_file), record=rid, field="class")
                xc, yc, w, h = (values[k] for k in ("x_center", "y_center", "width", "height"))
                for name in ("x_center", "y_center", "width", "height"):
                    if not 0.0 <= values[name] <= 1.0:
                        raise DatasetError(f"normalised coordinate {values[name]} outside [0, 1]", file=str(label_file), record=rid, field=name)
                W, H = size
                objects.append(loader.box(names[int(fields[0])], [(xc - w / 2) * W, (yc - h / 2) * H, (xc + w / 2) * W, (yc + h / 2) * H], size,
                                          file=str(label_file), record=rid, field="box"))
            return AnnotatedImage(image.resolve(), size, _reading_order([o for o in objects if o is not None]), str(labels))

        loader.add(str(label_file), image.stem, build)


def _load_voc(loader: _Loader, images: Path, annotations: Path) -> None:
    if not annotations.is_dir():
        raise DatasetError("Pascal VOC annotations must be the folder of .xml files", file=str(annotations))
    xml_files = sorted(annotations.glob("*.xml"))
    if not xml_files:
        raise DatasetError("the dataset is empty: no .xml files", file=str(annotations))
    for xml in xml_files:
        file = str(xml)

        def build(xml=xml, file=file) -> AnnotatedImage:
            try:
                root = ET.parse(xml).getroot()
            except ET.ParseError as err:
                raise DatasetError(f"invalid XML: {err}", file=file, record=xml.stem, field="xml") from err
            filename = root.findtext("filename")
            if not filename:
                raise DatasetError("no <filename>", file=file, record=xml.stem, field="filename")
            path = _confined(images, filename, file=file, record=xml.stem, field="filename")
            size_el = root.find("size")
            if size_el is None:
                raise DatasetError("no <size>", file=file, record=xml.stem, field="size")
            try:
                declared = (int(size_el.findtext("width")), int(size_el.findtext("height")))
            except (TypeError, ValueError):
                raise DatasetError("<size> needs integer <width> and <height>", file=file, record=xml.stem, field="size") from None
            size = _image_size(path, source=file, record=xml.stem)
            if declared != size:
                raise DatasetError(f"declared size {declared} differs from the image's {size}", file=file, record=xml.stem, field="size")
            objects = []
            for k, obj in enumerate(root.findall("object")):
                rid = f"{xml.stem} object {k}"
                name, box = obj.findtext("name"), obj.find("bndbox")
                if not name or box is None:
                    raise DatasetError("an object needs <name> and <bndbox>", file=file, record=rid, field="object")
                try:
                    x1, y1, x2, y2 = (float(box.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
                except (TypeError, ValueError):
                    raise DatasetError("<bndbox> needs numeric xmin, ymin, xmax, ymax", file=file, record=rid, field="bndbox") from None
                if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
                    raise DatasetError(f"non-finite <bndbox> value ({x1}, {y1}, {x2}, {y2})", file=file, record=rid, field="bndbox")
                # VOC corners are inclusive 1-based pixels (supervision's x1 - 1): xmax = xmin - 1 is a
                # box of zero width, smaller is a swapped box.
                objects.append(loader.box(name, [x1 - 1, y1 - 1, x2, y2], size, file=file, record=rid, field="bndbox"))
            return AnnotatedImage(path, size, _reading_order([o for o in objects if o is not None]), str(annotations))

        loader.add(file, xml.stem, build)


# ----------------------------------------------------------------------------------- questions
def synthesize_questions(image: AnnotatedImage, all_labels: list[str], seed: int = 0) -> list[dict]:
    """Counting, existence and left/right questions with answers verifiable from the boxes."""
    rng = random.Random(f"{seed}:{image.key}")
    counts = Counter(o["label"] for o in image.objects)
    if not counts:
        return []
    questions = []
    label = rng.choice(sorted(counts))
    questions.append({"type": "count", "question": f"How many {pluralize(label)} are in the image?", "answer": str(counts[label]), "labels": [label]})
    absent = sorted(set(all_labels) - set(counts))
    if absent and rng.random() < 0.5:
        other = rng.choice(absent)
        questions.append({"type": "exists", "question": f"Is there a {other} in the image?", "answer": "no", "labels": [other]})
    else:
        other = rng.choice(sorted(counts))
        questions.append({"type": "exists", "question": f"Is there a {other} in the image?", "answer": "yes", "labels": [other]})
    singles = sorted(l for l, c in counts.items() if c == 1)
    W = image.image_size[0]
    pairs = []
    for i, a in enumerate(singles):
        for b in singles[i + 1 :]:
            ca, cb = (_center_x(image, a), _center_x(image, b))
            if abs(ca - cb) > 0.1 * W:  # unambiguous only
                pairs.append((a, b))
    if pairs:
        a, b = rng.choice(pairs)
        if rng.random() < 0.5:
            a, b = b, a
        left = _center_x(image, a) < _center_x(image, b)
        questions.append({"type": "relation", "question": f"Is the {a} to the left of the {b}?", "answer": "yes" if left else "no", "labels": [a, b]})
    return questions


def _center_x(image: AnnotatedImage, label: str) -> float:
    box = next(o["bbox_px"] for o in image.objects if o["label"] == label)
    return (box[0] + box[2]) / 2


def _named_labels(question: str, labels: set[str]) -> list[str]:
    text = question.lower()
    return sorted(l for l in labels if re.search(rf"\b({re.escape(l.lower())}|{re.escape(pluralize(l).lower())})\b", text))


# -------------------------------------------------------------------------------------- records
def build_grounding(
    images: list[AnnotatedImage],
    out: str | Path,
    *,
    questions: str | Path | None = None,
    objects: str = "query",
    privileged_format: str = "qwen3vl_grounding",
    seed: int = 0,
    on_error: str = "fail",
    images_root: str | Path | None = None,
    report: BuildReport | None = None,
    embed_images: bool = False,
) -> BuildReport:
    """Records for every question about `images`, written atomically to `out` (JSONL).
    `report` may carry the loader's skips and counts (see `load_annotations`)."""
    check_on_error(on_error)
    if objects not in ("query", "all"):
        raise ValueError(f"objects must be 'query' or 'all', got {objects!r}")
    fmt = get_format(privileged_format)
    out = Path(out)
    out_dir = out.resolve().parent
    by_path = {img.image: img for img in images}
    all_labels = sorted({o["label"] for img in images for o in img.objects})
    report = report if report is not None else BuildReport()
    if questions is not None:
        items = _read_questions(Path(questions), Path(images_root) if images_root else None, by_path, on_error, report)
    else:
        items = []
        for img in images:
            qs = synthesize_questions(img, all_labels, seed)
            if not qs:
                report.counts["images without objects"] += 1
            items += [(img, f"{img.key}-{q['type']}", q) for q in qs]
    for img, rid, q in items:
        labels = set(q.get("labels") or []) or set(_named_labels(q["question"], {o["label"] for o in img.objects}))
        related = [o for o in img.objects if o["label"] in labels] if objects == "query" else []
        attached = related or img.objects
        privileged = {"format": fmt.name, "image_size": list(img.image_size), "objects": attached}
        image_part = {"type": "image"} if img.data is not None else {"type": "image", "image": os.path.relpath(img.image, out_dir)}
        record = {
            "id": rid,
            "prompt": [{"role": "user", "content": [image_part, {"type": "text", "text": q["question"]}]}],
            "privileged_context": fmt.render(privileged),
            "privileged": privileged,
            "meta": {"source": img.source, "image_size": list(img.image_size), "question_type": q.get("type", "given")},
        }
        if q.get("answer") is not None:
            record["answer"] = str(q["answer"])
        if img.data is not None:  # no local file: the image travels inside the record
            if Path(out).suffix == ".jsonl":
                raise DatasetError(f"image {img.image.name} has no local file: write a .parquet file or a dataset folder (--out) to embed it", file=img.source, record=rid, field="image")
            record["images"] = [{"bytes": img.data, "path": img.image.name}]
        report.records.append(record)
        report.counts[f"questions/{q.get('type', 'given')}"] += 1
        report.counts["objects attached"] += len(attached)
    return finish_build(report, out, embed_images)


def _read_questions(path: Path, root: Path | None, by_path: dict[Path, AnnotatedImage], on_error: str, report: BuildReport):
    """QA lines: {"image", "question", optional "answer", "id", "labels"}; image relative to the images root."""
    if not path.is_file():
        raise DatasetError("questions file not found", file=str(path))
    items, seen = [], set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where, rid = f"{path}:{n}", f"line {n}"
        try:
            try:
                q = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"invalid JSON: {err.msg}", file=where, record=rid, field=f"column {err.colno}") from err
            rid = str(q.get("id") or f"q{n}") if isinstance(q, dict) else rid
            if not isinstance(q, dict) or not isinstance(q.get("question"), str) or not isinstance(q.get("image"), str):
                raise DatasetError("each line needs string 'image' and 'question'", file=where, record=rid, field="question")
            if rid in seen:
                raise DatasetError("duplicate question id", file=where, record=rid, field="id")
            image = _confined(root, q["image"], file=where, record=rid, field="image") if root else Path(q["image"]).resolve()
            if image not in by_path:
                raise DatasetError(f"image {q['image']!r} is not in the annotated dataset", file=where, record=rid, field="image")
        except DatasetError as err:
            if on_error == "fail":
                raise
            report.skipped.append({"id": rid, "file": where, "reason": str(err)})
            continue
        seen.add(rid)
        items.append((by_path[image], rid, q))
    return items


# ------------------------------------------------------------------------------------- helpers
def _is_id(value) -> bool:
    """COCO ids are integers (not booleans, which Python counts as integers)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _supervision():
    """supervision warns at import that OpenCV is absent; its NumPy/Pillow path is what we use."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*OpenCV.*")
        import supervision

    return supervision


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DatasetError(f"invalid JSON: {err.msg}", file=str(path), record=f"line {err.lineno}", field=f"column {err.colno}") from err


def _confined(root: Path, name: str, *, file: str, record: str, field: str) -> Path:
    """An annotation's image path must stay inside the images root (no '../', no absolute path)."""
    if Path(name).is_absolute():
        raise DatasetError(f"absolute image path {name!r} is not allowed; paths are relative to {root}", file=file, record=record, field=field)
    root = root.resolve()
    path = (root / name).resolve()
    if root not in path.parents:
        raise DatasetError(f"image path {name!r} escapes the dataset root {root}", file=file, record=record, field=field)
    return path


def _image_size(path: Path | bytes, *, source: str, record: str) -> tuple[int, int]:
    """Open and fully decode: missing, unreadable and truncated images are caught here."""
    import io

    try:
        with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as img:
            img.load()
            return img.size
    except FileNotFoundError:
        raise DatasetError(f"image not found: {path}", file=source, record=record, field="image") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DatasetError(f"unreadable or truncated image {'(embedded bytes)' if isinstance(path, bytes) else path}: {err}", file=source, record=record, field="image") from None


def _clip(box: list[float], size: tuple[int, int]) -> list[float]:
    W, H = size
    return [min(max(box[0], 0.0), W), min(max(box[1], 0.0), H), min(max(box[2], 0.0), W), min(max(box[3], 0.0), H)]


def _reading_order(objects: list[dict]) -> list[dict]:
    """Sort boxes so that records do not depend on the annotation file's object order."""
    return sorted(objects, key=lambda o: (o["bbox_px"][0], o["bbox_px"][1], o["bbox_px"][2], o["bbox_px"][3], o["label"]))


def _find_yolo_classes(labels: Path) -> Path:
    for folder in (labels, labels.parent, labels.parent.parent, labels.parent.parent.parent):
        for name in ("data.yaml", "classes.txt"):
            if (folder / name).is_file():
                return folder / name
        yamls = sorted(folder.glob("*.yaml"))
        if len(yamls) == 1:
            return yamls[0]
    raise DatasetError("no class names found: pass --classes (a data.yaml with 'names' or a classes.txt)", file=str(labels))


def _yolo_class_names(path: Path) -> list[str]:
    import yaml

    if not path.is_file():
        raise DatasetError("classes file not found", file=str(path))
    if path.suffix in (".yaml", ".yml"):
        try:
            names = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("names")
        except yaml.YAMLError as err:
            raise DatasetError(f"invalid YAML: {err}", file=str(path), record="<root>", field="names") from err
        if isinstance(names, dict):
            names = [names[k] for k in sorted(names)]
        if not isinstance(names, list) or not names:
            raise DatasetError("no 'names' list or mapping", file=str(path), record="<root>", field="names")
        return [str(n) for n in names]
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise DatasetError("no class names", file=str(path), record="<root>", field="names")
    return names
