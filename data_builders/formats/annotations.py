"""What every annotation reader shares (docs/design.md §3.2): the image-with-boxes they produce, the
fault policy, and supervision's box conventions.

Every fault is a DatasetError naming file, record and field. `AnnotationLoader` applies one policy
to all of them: `on_error="fail"` stops at the first, `"skip"` leaves the faulty image out whole and
lists it in the report; boxes of zero width or height are `degenerate`: dropped and counted
(default), kept, or an error; negative extents (swapped corners), non-finite values and boxes
outside the image stay errors. The readers (coco.py, yolo.py, voc.py, hf.py) parse their files
into pixel xyxy boxes and hand every box to `AnnotationLoader.box`; `sv.Detections` (a detector's
output, and the rows of Hugging Face datasets) enter through `annotated_image_from_detections`.
Image paths are confined to the dataset root.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from data_builders.output import BuildReport
from dopd_vl.errors import DatasetError

logger = logging.getLogger(__name__)

__all__ = [
    "AnnotatedImage",
    "AnnotationLoader",
    "annotated_image_from_detections",
    "from_detections",
    "checked_image",
    "check_score",
    "finish_load",
    "DEGENERATE",
    "IMAGE_EXTENSIONS",
    "OUTSIDE_TOLERANCE",
]

IMAGE_EXTENSIONS = (".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp")
OUTSIDE_TOLERANCE = 0.02  # boxes may overhang the image by 2% of its size (annotation rounding); more is an error
DEGENERATE = ("drop", "keep", "fail")


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


class AnnotationLoader:
    """Collects images under the error, degenerate-box and score policies. A detector's box carries
    its confidence (`score`, a finite number in [0, 1]); with `min_score`, scored boxes below it are
    dropped and counted (boxes without a score, ground truth, are kept)."""

    def __init__(self, on_error: str, degenerate: str, report: BuildReport, min_score: float | None = None):
        self.on_error, self.degenerate, self.report, self.min_score = on_error, degenerate, report, min_score
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

    def box(
        self,
        label: str,
        box: list,
        size: tuple[int, int],
        *,
        file: str,
        record: str,
        field: str,
        score: float | None = None,
    ) -> dict | None:
        """A checked object in pixel xyxy (with its `score` when it has one), or None for a dropped
        degenerate box (zero width or height) or a scored box below `min_score`."""
        if score is not None:
            check_score(score, file=file, record=record)
            if self.min_score is not None and score < self.min_score:
                self.report.counts["boxes below --min-score dropped"] += 1
                return None
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
            raise DatasetError(f"box values must be numbers, got {box}", file=file, record=record, field=field)
        if not all(math.isfinite(v) for v in box):
            raise DatasetError(f"non-finite box value in {box}", file=file, record=record, field=field)
        W, H = size
        x1, y1, x2, y2 = box
        if x2 < x1 or y2 < y1:
            raise DatasetError(
                f"box with negative width or height (swapped corners?) {box}", file=file, record=record, field=field
            )
        mx, my = OUTSIDE_TOLERANCE * W, OUTSIDE_TOLERANCE * H
        if x1 < -mx or y1 < -my or x2 > W + mx or y2 > H + my:
            raise DatasetError(
                f"box {[round(v, 1) for v in box]} lies outside the {W}x{H} image",
                file=file,
                record=record,
                field=field,
            )
        if x2 == x1 or y2 == y1:
            if self.degenerate == "fail":
                raise DatasetError(
                    f"box of zero width or height {box} (--degenerate drop|keep to accept)",
                    file=file,
                    record=record,
                    field=field,
                )
            self.report.counts[f"degenerate boxes {'dropped' if self.degenerate == 'drop' else 'kept'}"] += 1
            if self.degenerate == "drop":
                return None
        obj = {"label": label, "bbox_px": clip_box([round(float(v), 2) for v in box], size)}
        if score is not None:
            obj["score"] = round(float(score), 4)
        return obj

    def objects(self, objects: list[dict | None], *, file: str, record: str) -> list[dict]:
        """An image's kept objects in reading order; two predictions of one label on one box (a
        detector's duplicate) are a fault naming the image."""
        kept = [o for o in objects if o is not None]
        seen = set()
        for o in kept:
            key = (o["label"], tuple(o["bbox_px"]))
            if "score" in o and key in seen:
                raise DatasetError(
                    f"duplicate prediction: {o['label']!r} twice on box {o['bbox_px']} (run NMS, or drop one)",
                    file=file,
                    record=record,
                    field="bbox",
                )
            seen.add(key)
        return reading_order(kept)


def check_score(score, *, file: str, record: str) -> None:
    """A detector's confidence: a finite number in [0, 1] (a DatasetError naming the field `score`)."""
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise DatasetError(f"score must be a finite number, got {score!r}", file=file, record=record, field="score")
    if not 0.0 <= score <= 1.0:
        raise DatasetError(f"score {score} outside [0, 1]", file=file, record=record, field="score")


def annotated_image_from_detections(
    image: str | Path,
    detections,
    class_names: list[str] | dict[int, str],
    source: str = "detections",
    degenerate: str = "drop",
    report: BuildReport | None = None,
    min_score: float | None = None,
) -> AnnotatedImage:
    """An `sv.Detections` (e.g. a detector's output) for one image -> AnnotatedImage.

    `class_names[class_id]` names each detection; boxes are the detections' xyxy pixels; each
    object keeps its `confidence` as `score` when the detections have one (`min_score` drops the
    boxes below it, counted in `report`).
    """
    loader = AnnotationLoader("fail", degenerate, report if report is not None else BuildReport(), min_score)
    path = Path(image).resolve()
    size = image_size(path, source=source, record=path.name)
    labels = []
    for i, class_id in enumerate(detections.class_id):
        try:
            labels.append(class_names[int(class_id)])
        except (IndexError, KeyError) as err:
            raise DatasetError(
                f"class id {int(class_id)} has no name",
                file=source,
                record=f"{path.name} detection {i}",
                field="class_id",
            ) from err
    confidence = getattr(detections, "confidence", None)
    scores = None if confidence is None else [float(c) for c in confidence]
    return checked_image(
        path, None, size, detections.xyxy, labels, source, f"{path.name} detection", "xyxy", loader, scores
    )


def from_detections(
    path: Path,
    data: bytes | None,
    size: tuple[int, int],
    xyxy: list[list[float]],
    labels: list[str],
    source: str,
    record: str,
    loader,
) -> AnnotatedImage:
    """Boxes and labels of one dataset row as an `sv.Detections` (supervision's form of a
    detector's output), then the same path as `annotated_image_from_detections`."""
    import numpy as np

    sv = supervision()
    classes = sorted(set(labels))
    detections = sv.Detections(
        xyxy=np.array(xyxy, dtype=float).reshape(-1, 4),
        class_id=np.array([classes.index(l) for l in labels], dtype=int),
    )
    return checked_image(
        path,
        data,
        size,
        detections.xyxy,
        [classes[int(c)] for c in detections.class_id],
        source,
        f"{record} object",
        "bbox",
        loader,
    )


def checked_image(
    path: Path,
    data: bytes | None,
    size: tuple[int, int],
    xyxy,
    labels: list[str],
    source: str,
    record: str,
    field: str,
    loader,
    scores: list[float] | None = None,
) -> AnnotatedImage:
    objects = [
        loader.box(
            label,
            [float(v) for v in box],
            size,
            file=source,
            record=f"{record} {k}",
            field=field,
            score=None if scores is None else scores[k],
        )
        for k, (box, label) in enumerate(zip(xyxy, labels))
    ]
    return AnnotatedImage(path, size, loader.objects(objects, file=source, record=record), source, data)


def finish_load(loader: AnnotationLoader, file: str) -> list[AnnotatedImage]:
    """The loaded images; a dataset left with none (every image skipped) is an error naming the first reason."""
    if not loader.images:
        reasons = (
            f" ({len(loader.report.skipped)} skipped; first: {loader.report.skipped[0]['reason']})"
            if loader.report.skipped
            else ""
        )
        raise DatasetError(f"the dataset is empty: no usable image{reasons}", file=file)
    return loader.images


def is_id(value) -> bool:
    """COCO ids are integers (not booleans, which Python counts as integers)."""
    return isinstance(value, int) and not isinstance(value, bool)


def supervision():
    """supervision warns at import that OpenCV is absent; its NumPy/Pillow path is what we use."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*OpenCV.*")
        import supervision

    return supervision


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        # Python's whole message (with line and column); no field: the file is not yet records
        raise DatasetError(f"invalid JSON: {err}", file=str(path), record=f"line {err.lineno}") from err


def confined(root: Path, name: str, *, file: str, record: str, field: str) -> Path:
    """An annotation's image path must stay inside the images root (no '../', no absolute path)."""
    if Path(name).is_absolute():
        raise DatasetError(
            f"absolute image path {name!r} is not allowed; paths are relative to {root}",
            file=file,
            record=record,
            field=field,
        )
    root = root.resolve()
    path = (root / name).resolve()
    if root not in path.parents:
        raise DatasetError(
            f"image path {name!r} escapes the dataset root {root}", file=file, record=record, field=field
        )
    return path


def image_size(path: Path | bytes, *, source: str, record: str) -> tuple[int, int]:
    """Open and fully decode: missing, unreadable and truncated images are caught here."""
    import io

    try:
        with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as img:
            img.load()
            return img.size
    except FileNotFoundError:
        raise DatasetError(f"image not found: {path}", file=source, record=record, field="image") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DatasetError(
            f"unreadable or truncated image {'(embedded bytes)' if isinstance(path, bytes) else path}: {err}",
            file=source,
            record=record,
            field="image",
        ) from None


def clip_box(box: list[float], size: tuple[int, int]) -> list[float]:
    W, H = size
    return [min(max(box[0], 0.0), W), min(max(box[1], 0.0), H), min(max(box[2], 0.0), W), min(max(box[3], 0.0), H)]


def reading_order(objects: list[dict]) -> list[dict]:
    """Sort boxes so that records do not depend on the annotation file's object order."""
    return sorted(
        objects, key=lambda o: (o["bbox_px"][0], o["bbox_px"][1], o["bbox_px"][2], o["bbox_px"][3], o["label"])
    )
