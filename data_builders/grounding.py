"""Privileged grounding datasets from detection annotations (docs/design.md §3.2).

`load_annotations` is the one face over the readers, one module per source format (coco.py,
yolo.py, voc.py; hf.py for Hugging Face detection datasets), which share the fault policy and box
conventions of annotations.py; `sv.Detections` from a detector enter through
`annotated_image_from_detections`. Classes are keyed by name everywhere, because supervision
renumbers VOC classes.

Questions come from a QA file or are synthesised with verifiable answers: counting, existence
(negatives use labels absent from the image) and left/right relations between two objects that
occur once. Attached boxes are the query-related ones (objects whose label the question names or
the given labels, else all objects) unless `objects="all"`.
"""

from __future__ import annotations

import io
import logging
import os
import random
import re
from collections import Counter
from pathlib import Path

from PIL import Image

from data_builders.formats.annotations import (
    DEGENERATE,
    AnnotatedImage,
    AnnotationLoader,
    annotated_image_from_detections,
    confined,
    finish_load,
)
from data_builders.formats.coco import load_coco
from data_builders.formats.detector_results import load_coco_results
from data_builders.formats.hf import load_hf_detections
from data_builders.formats.voc import load_voc
from data_builders.formats.yolo import load_yolo
from data_builders.output import BuildReport, check_on_error, finish_build, portable_source
from data_builders.privileged import get_format
from dopd_vl.data.sources import json_lines
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
    "with_article",
]

_IRREGULAR_PLURALS = {
    "person": "people",
    "broccoli": "heads of broccoli",  # a mass noun: counted in heads
    "mouse": "mice",
    "knife": "knives",
    "sheep": "sheep",
    "skis": "skis",
    "scissors": "scissors",
    "bus": "buses",
    "glass": "glasses",
    "bench": "benches",
    "couch": "couches",
    "sandwich": "sandwiches",
    "toothbrush": "toothbrushes",
    "wine glass": "wine glasses",
    "tv": "TVs",
}
_MASS_NOUNS = frozenset({"broccoli"})
"""Labels that take no article in a question ("Is there broccoli ...")."""


def with_article(label: str) -> str:
    """`a` / `an` by the label's first letter (`an airplane`, `a umbrella` never), none for a mass noun."""
    if label in _MASS_NOUNS:
        return label
    return f"{'an' if label[:1].lower() in 'aeiou' else 'a'} {label}"


def pluralize(label: str) -> str:
    if label in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[label]
    if label.endswith(("s", "x", "ch", "sh")):
        return label + "es"
    if label.endswith("y") and label[-2:-1] not in "aeiou":
        return label[:-1] + "ies"
    return label + "s"


# ------------------------------------------------------------------------------------- loading
def load_annotations(
    fmt: str,
    images: str | Path,
    annotations: str | Path,
    classes: str | Path | None = None,
    *,
    on_error: str = "fail",
    degenerate: str = "drop",
    report: BuildReport | None = None,
    min_score: float | None = None,
    categories: str | Path | None = None,
) -> list[AnnotatedImage]:
    """Validate and load a detection dataset, or a detector's predictions; every image is opened and
    decoded once.

    Formats: `coco`, `yolo` (with a sixth confidence column for predictions), `voc`, and
    `coco_results` (a detector's results list; `categories` resolves its ids: detector_results.py).
    A prediction keeps its confidence as the object's `score`; `min_score` drops scored boxes
    below it (counted in the report).

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
    if min_score is not None and not 0.0 <= min_score <= 1.0:
        raise ValueError(f"min_score must be in [0, 1], got {min_score}")
    loader = AnnotationLoader(on_error, degenerate, report if report is not None else BuildReport(), min_score)
    if fmt == "coco":
        load_coco(loader, images, annotations)
    elif fmt == "coco_results":
        load_coco_results(loader, images, annotations, Path(categories) if categories else None)
    elif fmt == "yolo":
        load_yolo(loader, images, annotations, classes)
    elif fmt == "voc":
        load_voc(loader, images, annotations)
    else:
        raise ValueError(f"unknown annotation format {fmt!r}; expected coco, coco_results, yolo or voc")
    return sorted(finish_load(loader, str(annotations)), key=lambda img: str(img.image))


# ----------------------------------------------------------------------------------- questions
def synthesize_questions(image: AnnotatedImage, all_labels: list[str], seed: int = 0) -> list[dict]:
    """Counting, existence and left/right questions with answers verifiable from the boxes."""
    rng = random.Random(f"{seed}:{image.key}")
    counts = Counter(o["label"] for o in image.objects)
    if not counts:
        return []
    questions = []
    label = rng.choice(sorted(counts))
    questions.append(
        {
            "type": "count",
            "question": f"How many {pluralize(label)} are in the image?",
            "answer": str(counts[label]),
            "labels": [label],
        }
    )
    absent = sorted(set(all_labels) - set(counts))
    if absent and rng.random() < 0.5:
        other = rng.choice(absent)
        questions.append(
            {
                "type": "exists",
                "question": f"Is there {with_article(other)} in the image?",
                "answer": "no",
                "labels": [other],
            }
        )
    else:
        other = rng.choice(sorted(counts))
        questions.append(
            {
                "type": "exists",
                "question": f"Is there {with_article(other)} in the image?",
                "answer": "yes",
                "labels": [other],
            }
        )
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
        questions.append(
            {
                "type": "relation",
                "question": f"Is the {a} to the left of the {b}?",
                "answer": "yes" if left else "no",
                "labels": [a, b],
            }
        )
    return questions


def _center_x(image: AnnotatedImage, label: str) -> float:
    box = next(o["bbox_px"] for o in image.objects if o["label"] == label)
    return (box[0] + box[2]) / 2


def _named_labels(question: str, labels: set[str]) -> list[str]:
    text = question.lower()
    return sorted(
        l for l in labels if re.search(rf"\b({re.escape(l.lower())}|{re.escape(pluralize(l).lower())})\b", text)
    )


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
    images_dir: str | None = None,
) -> BuildReport:
    """Records for every question about `images`, written atomically to `out` (JSONL, Parquet or a
    dataset folder). `report` may carry the loader's skips and counts (see `load_annotations`).
    Images that exist only as bytes (datasets sources) are embedded in Parquet and folder outputs;
    beside a JSONL output they are written into `images_dir` (a folder name relative to the
    output's folder, default `<out stem>_images`), together with the JSONL or not at all."""
    check_on_error(on_error)
    if objects not in ("query", "all"):
        raise ValueError(f"objects must be 'query' or 'all', got {objects!r}")
    fmt = get_format(privileged_format)
    out = Path(out)
    out_dir = out.resolve().parent
    by_path = {img.image: img for img in images}
    all_labels = sorted({o["label"] for img in images for o in img.objects})
    report = report if report is not None else BuildReport()
    jsonl = out.suffix == ".jsonl"
    images_dir = _images_dir(images_dir, out) if jsonl else None
    written: dict[int, str] = {}  # id(AnnotatedImage) -> its file beside the JSONL
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
        if img.data is None:
            image_part = {"type": "image", "image": os.path.relpath(img.image, out_dir)}
        elif jsonl:  # no local file: written beside the JSONL
            if id(img) not in written:
                written[id(img)] = _image_file(img, images_dir, report.files)
            image_part = {"type": "image", "image": written[id(img)]}
        else:
            image_part = {"type": "image"}
        record = {
            "id": rid,
            "prompt": [{"role": "user", "content": [image_part, {"type": "text", "text": q["question"]}]}],
            "privileged_context": fmt.render(privileged),
            "privileged": privileged,
            "meta": {
                "source": portable_source(img.source, out),
                "image_size": list(img.image_size),
                "question_type": q.get("type", "given"),
            },
        }
        if q.get("answer") is not None:
            record["answer"] = str(q["answer"])
        if img.data is not None and not jsonl:  # no local file: the image travels inside the record
            record["images"] = [{"bytes": img.data, "path": img.image.name}]
        report.records.append(record)
        report.counts[f"questions/{q.get('type', 'given')}"] += 1
        report.counts["objects attached"] += len(attached)
    return finish_build(report, out, embed_images)


def _images_dir(name: str | None, out: Path) -> str:
    """The folder beside a JSONL output for images without a local file: one plain relative name."""
    name = name if name is not None else f"{out.stem}_images"
    parts = Path(name).parts
    if not parts or Path(name).is_absolute() or any(p in ("..", ".") for p in parts):
        raise DatasetError(
            f"--images-dir {name!r} must be a folder name inside the output's folder", file=str(out), field="images_dir"
        )
    return Path(*parts).as_posix()


def _image_file(img: AnnotatedImage, images_dir: str, files: dict[str, bytes]) -> str:
    """Register an image's bytes as a file in `images_dir`, named by its image id (and its format's
    suffix), de-duplicated; returns its path relative to the output's folder."""
    with Image.open(io.BytesIO(img.data)) as decoded:
        suffix = {"JPEG": ".jpg"}.get(decoded.format, f".{(decoded.format or 'png').lower()}")
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", img.key) or "image"
    name, k = f"{images_dir}/{stem}{suffix}", 1
    while name in files:
        name, k = f"{images_dir}/{stem}-{k}{suffix}", k + 1
    files[name] = img.data
    return name


def _read_questions(
    path: Path, root: Path | None, by_path: dict[Path, AnnotatedImage], on_error: str, report: BuildReport
):
    """QA lines: {"image", "question", optional "answer", "id", "labels"}; image relative to the images root."""
    if not path.is_file():
        raise DatasetError("questions file not found", file=str(path))
    items, seen = [], set()
    for n, q in json_lines(path):
        where, rid = f"{path}:{n}", f"line {n}"
        try:
            if isinstance(q, DatasetError):
                raise q
            rid = str(q.get("id") or f"q{n}") if isinstance(q, dict) else rid
            if not isinstance(q, dict) or not isinstance(q.get("question"), str) or not isinstance(q.get("image"), str):
                raise DatasetError(
                    "each line needs string 'image' and 'question'", file=where, record=rid, field="question"
                )
            if rid in seen:
                raise DatasetError("duplicate question id", file=where, record=rid, field="id")
            image = (
                confined(root, q["image"], file=where, record=rid, field="image")
                if root
                else Path(q["image"]).resolve()
            )
            if image not in by_path:
                raise DatasetError(
                    f"image {q['image']!r} is not in the annotated dataset", file=where, record=rid, field="image"
                )
        except DatasetError as err:
            if on_error == "fail":
                raise
            report.skipped.append({"id": rid, "file": where, "reason": str(err)})
            continue
        seen.add(rid)
        items.append((by_path[image], rid, q))
    return items
