"""YOLO label folders (docs/design.md §3.2): one `.txt` per image, `class x_center y_center width
height` in 0-1 per line, or with a sixth column, the detector's confidence (Ultralytics' predictions
with `save_conf=True`): every row of a file has the same width; class names from a data.yaml
(`names`) or a classes.txt."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from data_builders.formats.annotations import (
    IMAGE_EXTENSIONS,
    AnnotatedImage,
    AnnotationLoader,
    image_size,
)
from dopd_vl.errors import DatasetError

logger = logging.getLogger(__name__)

__all__ = ["load_yolo"]


def load_yolo(loader: AnnotationLoader, images: Path, labels: Path, classes: str | Path | None) -> None:
    """Every image of the images folder into `loader`, with its label file (none: no objects)."""
    if not labels.is_dir():
        raise DatasetError("YOLO annotations must be the folder of label .txt files", file=str(labels))
    classes_path = Path(classes) if classes else _find_yolo_classes(labels)
    names = yolo_class_names(classes_path)
    image_files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not image_files:
        raise DatasetError("the dataset is empty: no images", file=str(images))
    for image in image_files:
        label_file = labels / f"{image.stem}.txt"

        def build(image=image, label_file=label_file) -> AnnotatedImage:
            size = image_size(image, source=str(images), record=image.name)
            objects = []
            try:
                lines = label_file.read_text(encoding="utf-8").splitlines() if label_file.exists() else []
            except UnicodeDecodeError as err:
                raise DatasetError(
                    f"not a text file: {err}", file=str(label_file), record=image.stem, field="labels"
                ) from None
            width = None  # the file's row width: 5 (labels) or 6 (predictions with confidence)
            for n, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                fields = line.split()
                rid = f"line {n}"
                if len(fields) not in (5, 6):
                    raise DatasetError(
                        f"expected 5 columns (class x_center y_center width height) or 6 (with the confidence), got "
                        f"{len(fields)}",
                        file=str(label_file),
                        record=rid,
                        field="columns",
                    )
                if width is not None and len(fields) != width:
                    raise DatasetError(
                        f"this row has {len(fields)} columns and the file's first row {width}: every row of a file "
                        "has the confidence column or none does",
                        file=str(label_file),
                        record=rid,
                        field="columns",
                    )
                width = len(fields)
                values = {}
                for name, value in zip(("class", "x_center", "y_center", "width", "height", "score"), fields):
                    try:
                        values[name] = float(value)
                    except ValueError:
                        raise DatasetError(
                            f"non-numeric value {value!r}", file=str(label_file), record=rid, field=name
                        ) from None
                    if not math.isfinite(values[name]):
                        raise DatasetError(f"non-finite value {value!r}", file=str(label_file), record=rid, field=name)
                if not fields[0].isdigit() or int(fields[0]) >= len(names):
                    raise DatasetError(
                        f"class {fields[0]} out of range (the dataset has {len(names)} classes)",
                        file=str(label_file),
                        record=rid,
                        field="class",
                    )
                xc, yc, w, h = (values[k] for k in ("x_center", "y_center", "width", "height"))
                for name in ("x_center", "y_center", "width", "height"):
                    if not 0.0 <= values[name] <= 1.0:
                        raise DatasetError(
                            f"normalised coordinate {values[name]} outside [0, 1]",
                            file=str(label_file),
                            record=rid,
                            field=name,
                        )
                W, H = size
                objects.append(
                    loader.box(
                        names[int(fields[0])],
                        [(xc - w / 2) * W, (yc - h / 2) * H, (xc + w / 2) * W, (yc + h / 2) * H],
                        size,
                        file=str(label_file),
                        record=rid,
                        field="box",
                        score=values.get("score"),
                    )
                )
            return AnnotatedImage(
                image.resolve(), size, loader.objects(objects, file=str(label_file), record=image.stem), str(labels)
            )

        loader.add(str(label_file), image.stem, build)
    # Label files whose image is not in the images folder: nothing is built from them; said, not silent.
    stems = {image.stem for image in image_files}
    orphans = sorted(p.name for p in labels.glob("*.txt") if p.stem not in stems and p.name != "classes.txt")
    if orphans:
        loader.report.counts["label files without an image"] += len(orphans)
        shown = ", ".join(orphans[:5]) + (f" and {len(orphans) - 5} more" if len(orphans) > 5 else "")
        logger.warning("%d label files in %s have no image in %s (not built): %s", len(orphans), labels, images, shown)


def _find_yolo_classes(labels: Path) -> Path:
    for folder in (labels, labels.parent, labels.parent.parent, labels.parent.parent.parent):
        for name in ("data.yaml", "classes.txt"):
            if (folder / name).is_file():
                return folder / name
        yamls = sorted(folder.glob("*.yaml"))
        if len(yamls) == 1:
            return yamls[0]
    raise DatasetError(
        "no class names found: pass --classes (a data.yaml with 'names' or a classes.txt)", file=str(labels)
    )


def yolo_class_names(path: Path) -> list[str]:
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
