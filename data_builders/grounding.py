"""Privileged grounding datasets from detection annotations (DESIGN.md 3.2).

COCO JSON, YOLO label folders and Pascal VOC XML are first checked by our own validators, which
name the file, record and field of the first fault (supervision's loaders accept several of the
faults we reject, e.g. swapped VOC corners), then loaded with supervision. `sv.Detections` from a
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

    image: Path  # absolute
    image_size: tuple[int, int]  # (W, H)
    objects: list[dict]  # {"label": str, "bbox_px": [x1, y1, x2, y2]}, in reading order
    source: str  # the annotation file

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
def load_annotations(fmt: str, images: str | Path, annotations: str | Path, classes: str | Path | None = None) -> list[AnnotatedImage]:
    """Validate then load a detection dataset; every image is opened and decoded once."""
    images = Path(images)
    if not images.is_dir():
        raise DatasetError("images folder not found", file=str(images))
    annotations = Path(annotations)
    if not annotations.exists():
        raise DatasetError("annotations not found", file=str(annotations))
    if fmt == "coco":
        return _load_coco(images, annotations)
    if fmt == "yolo":
        return _load_yolo(images, annotations, classes)
    if fmt == "voc":
        return _load_voc(images, annotations)
    raise ValueError(f"unknown annotation format {fmt!r}; expected coco, yolo or voc")


def annotated_image_from_detections(image: str | Path, detections, class_names: list[str] | dict[int, str], source: str = "detections") -> AnnotatedImage:
    """An `sv.Detections` (e.g. a detector's output) for one image -> AnnotatedImage.

    `class_names[class_id]` names each detection; boxes are the detections' xyxy pixels.
    """
    path = Path(image).resolve()
    size = _image_size(path, source=source, record=path.name)
    objects = []
    for i, (box, class_id) in enumerate(zip(detections.xyxy, detections.class_id)):
        try:
            label = class_names[int(class_id)]
        except (IndexError, KeyError) as err:
            raise DatasetError(f"class id {int(class_id)} has no name", file=source, record=f"{path.name} detection {i}", field="class_id") from err
        objects.append(_checked_object(label, [float(v) for v in box], size, file=source, record=f"{path.name} detection {i}", field="xyxy"))
    return AnnotatedImage(path, size, _reading_order(objects), source)


def _load_coco(images: Path, annotations: Path) -> list[AnnotatedImage]:
    sv = _supervision()

    data = _read_json(annotations)
    file = str(annotations)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key) if isinstance(data, dict) else None, list):
            raise DatasetError(f"COCO file has no {key!r} list", file=file, record="<root>", field=key)
    categories = {}
    for c in data["categories"]:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise DatasetError("each category needs an integer id and a name", file=file, record=f"category {c.get('id') if isinstance(c, dict) else c}", field="categories")
        categories[c["id"]] = c["name"]
    image_info, sizes, names_seen = {}, {}, set()
    for entry in data["images"]:
        rid = f"image id {entry.get('id') if isinstance(entry, dict) else entry}"
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), int) or not isinstance(entry.get("file_name"), str):
            raise DatasetError("each image needs an integer id and a file_name", file=file, record=rid, field="images")
        if entry["id"] in image_info or entry["file_name"] in names_seen:
            raise DatasetError("duplicate image id or file_name", file=file, record=rid, field="images.id")
        path = _confined(images, entry["file_name"], file=file, record=rid, field="file_name")
        size = _image_size(path, source=file, record=rid)
        declared = (entry.get("width"), entry.get("height"))
        if declared != (None, None) and tuple(declared) != size:
            raise DatasetError(f"declared size {declared} differs from the image's {size}", file=file, record=rid, field="width/height")
        image_info[entry["id"]], sizes[entry["id"]] = path, size
        names_seen.add(entry["file_name"])
    for a in data["annotations"]:
        rid = f"annotation id {a.get('id') if isinstance(a, dict) else a}"
        if not isinstance(a, dict):
            raise DatasetError("an annotation must be an object", file=file, record=rid, field="annotations")
        if a.get("image_id") not in image_info:
            raise DatasetError(f"unknown image id {a.get('image_id')!r}", file=file, record=rid, field="image_id")
        if a.get("category_id") not in categories:
            raise DatasetError(f"unknown category id {a.get('category_id')!r}", file=file, record=rid, field="category_id")
        bbox = a.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise DatasetError("bbox must be [x, y, width, height] numbers", file=file, record=rid, field="bbox")
        x, y, w, h = bbox
        if w <= 0 or h <= 0:
            raise DatasetError(f"box with non-positive width or height {bbox}", file=file, record=rid, field="bbox")
        _checked_object(categories[a["category_id"]], [x, y, x + w, y + h], sizes[a["image_id"]], file=file, record=rid, field="bbox")
    if not image_info:
        raise DatasetError("the dataset is empty: no images", file=file, record="<root>", field="images")
    # Validated: supervision loads it. (Crowd annotations are kept as boxes, as supervision does.)
    dataset = sv.DetectionDataset.from_coco(images_directory_path=str(images), annotations_path=str(annotations))
    return _from_supervision(dataset, file, sizes={str(p): sizes[i] for i, p in image_info.items()})


def _load_yolo(images: Path, labels: Path, classes: str | Path | None) -> list[AnnotatedImage]:
    sv = _supervision()
    import yaml

    if not labels.is_dir():
        raise DatasetError("YOLO annotations must be the folder of label .txt files", file=str(labels))
    classes_path = Path(classes) if classes else _find_yolo_classes(labels)
    names = _yolo_class_names(classes_path)
    image_files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not image_files:
        raise DatasetError("the dataset is empty: no images", file=str(images))
    sizes = {}
    for image in image_files:
        sizes[str(image.resolve())] = size = _image_size(image, source=str(images), record=image.name)
        label_file = labels / f"{image.stem}.txt"
        if not label_file.exists():
            continue
        for n, line in enumerate(label_file.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split()
            rid = f"line {n}"
            if len(fields) != 5:
                raise DatasetError(f"expected 5 fields (class x_center y_center width height), got {len(fields)}", file=str(label_file), record=rid, field="fields")
            for name, value in zip(("class", "x_center", "y_center", "width", "height"), fields):
                try:
                    float(value)
                except ValueError:
                    raise DatasetError(f"non-numeric value {value!r}", file=str(label_file), record=rid, field=name) from None
            if not fields[0].isdigit() or int(fields[0]) >= len(names):
                raise DatasetError(f"class {fields[0]} out of range (the dataset has {len(names)} classes)", file=str(label_file), record=rid, field="class")
            xc, yc, w, h = map(float, fields[1:])
            for name, value in zip(("x_center", "y_center", "width", "height"), (xc, yc, w, h)):
                if not 0.0 <= value <= 1.0:
                    raise DatasetError(f"normalised coordinate {value} outside [0, 1]", file=str(label_file), record=rid, field=name)
            if w <= 0 or h <= 0:
                raise DatasetError("box with non-positive width or height", file=str(label_file), record=rid, field="width/height")
            W, H = size
            _checked_object(names[int(fields[0])], [(xc - w / 2) * W, (yc - h / 2) * H, (xc + w / 2) * W, (yc + h / 2) * H], size, file=str(label_file), record=rid, field="box")
    # supervision wants a data.yaml with the names; a classes.txt is converted into one.
    yaml_path = classes_path
    if classes_path.suffix not in (".yaml", ".yml"):
        import tempfile

        tmp = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
        yaml.safe_dump({"names": names}, tmp)
        tmp.close()
        yaml_path = Path(tmp.name)
    try:
        dataset = sv.DetectionDataset.from_yolo(images_directory_path=str(images), annotations_directory_path=str(labels), data_yaml_path=str(yaml_path))
    finally:
        if yaml_path != classes_path:
            os.unlink(yaml_path)
    return _from_supervision(dataset, str(labels), sizes=sizes)


def _load_voc(images: Path, annotations: Path) -> list[AnnotatedImage]:
    sv = _supervision()

    if not annotations.is_dir():
        raise DatasetError("Pascal VOC annotations must be the folder of .xml files", file=str(annotations))
    xml_files = sorted(annotations.glob("*.xml"))
    if not xml_files:
        raise DatasetError("the dataset is empty: no .xml files", file=str(annotations))
    sizes = {}
    for xml in xml_files:
        file = str(xml)
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
        sizes[str(path)] = size
        for k, obj in enumerate(root.findall("object")):
            rid = f"{xml.stem} object {k}"
            name, box = obj.findtext("name"), obj.find("bndbox")
            if not name or box is None:
                raise DatasetError("an object needs <name> and <bndbox>", file=file, record=rid, field="object")
            try:
                x1, y1, x2, y2 = (float(box.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
            except (TypeError, ValueError):
                raise DatasetError("<bndbox> needs numeric xmin, ymin, xmax, ymax", file=file, record=rid, field="bndbox") from None
            if x2 <= x1 or y2 <= y1:
                raise DatasetError(f"box with non-positive width or height ({x1}, {y1}, {x2}, {y2})", file=file, record=rid, field="bndbox")
            _checked_object(name, [x1 - 1, y1 - 1, x2, y2], size, file=file, record=rid, field="bndbox")
    dataset = sv.DetectionDataset.from_pascal_voc(images_directory_path=str(images), annotations_directory_path=str(annotations))
    return _from_supervision(dataset, str(annotations), sizes=sizes)


def _from_supervision(dataset, source: str, sizes: dict[str, tuple[int, int]]) -> list[AnnotatedImage]:
    out = []
    for image_path in sorted(dataset.image_paths):
        detections = dataset.annotations[image_path]
        path = Path(image_path).resolve()
        if str(path) not in sizes:  # supervision's VOC loader also lists images without an XML file
            continue
        size = sizes[str(path)]
        objects = [
            {"label": dataset.classes[int(c)], "bbox_px": _clip([round(float(v), 2) for v in box], size)}
            for box, c in zip(detections.xyxy, detections.class_id)
        ]
        out.append(AnnotatedImage(path, size, _reading_order(objects), source))
    return out


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
) -> BuildReport:
    """Records for every question about `images`, written atomically to `out` (JSONL)."""
    check_on_error(on_error)
    if objects not in ("query", "all"):
        raise ValueError(f"objects must be 'query' or 'all', got {objects!r}")
    fmt = get_format(privileged_format)
    out = Path(out)
    out_dir = out.resolve().parent
    by_path = {img.image: img for img in images}
    all_labels = sorted({o["label"] for img in images for o in img.objects})
    report = BuildReport()
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
        record = {
            "id": rid,
            "prompt": [{"role": "user", "content": [{"type": "image", "image": os.path.relpath(img.image, out_dir)}, {"type": "text", "text": q["question"]}]}],
            "privileged_context": fmt.render(privileged),
            "privileged": privileged,
            "meta": {"source": img.source, "image_size": list(img.image_size), "question_type": q.get("type", "given")},
        }
        if q.get("answer") is not None:
            record["answer"] = str(q["answer"])
        report.records.append(record)
        report.counts[f"questions/{q.get('type', 'given')}"] += 1
        report.counts["objects attached"] += len(attached)
    return finish_build(report, out)


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


def _image_size(path: Path, *, source: str, record: str) -> tuple[int, int]:
    """Open and fully decode: missing, unreadable and truncated images are caught here."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.size
    except FileNotFoundError:
        raise DatasetError(f"image not found: {path}", file=source, record=record, field="image") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DatasetError(f"unreadable or truncated image {path}: {err}", file=source, record=record, field="image") from None


def _checked_object(label: str, box: list[float], size: tuple[int, int], *, file: str, record: str, field: str) -> dict:
    W, H = size
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        raise DatasetError(f"box with non-positive width or height {box}", file=file, record=record, field=field)
    mx, my = OUTSIDE_TOLERANCE * W, OUTSIDE_TOLERANCE * H
    if x1 < -mx or y1 < -my or x2 > W + mx or y2 > H + my:
        raise DatasetError(f"box {[round(v, 1) for v in box]} lies outside the {W}x{H} image", file=file, record=record, field=field)
    return {"label": label, "bbox_px": _clip([round(v, 2) for v in box], size)}


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
