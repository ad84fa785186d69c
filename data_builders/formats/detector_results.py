"""COCO results JSON (docs/design.md §3.2): what a detector's evaluation writes and pycocotools reads,
a list of {"image_id", "category_id", "bbox": [x, y, width, height], "score"}.

The results name images and categories by id only; `categories` resolves them: a COCO annotations
file (its `images` give each id's file_name, its `categories` the names), or a names file
(data.yaml with `names`, or classes.txt: category_id k is the k-th name) with the images found by
their integer file stems (000000000009.jpg is image 9). Every fault names the file, the entry
(`result k`, 0-based) or image and the field, under the build's fail / skip policy.
"""

from __future__ import annotations

from pathlib import Path

from data_builders.formats.annotations import (
    IMAGE_EXTENSIONS,
    AnnotatedImage,
    AnnotationLoader,
    confined,
    image_size,
    is_id,
    read_json,
)
from data_builders.formats.yolo import yolo_class_names
from dopd_vl.errors import DatasetError

__all__ = ["load_coco_results"]


def load_coco_results(loader: AnnotationLoader, images: Path, results: Path, categories: Path | None) -> None:
    """Every image the results' images list (or folder) holds into `loader`, with its predictions."""
    file = str(results)
    if categories is None:
        raise DatasetError(
            "COCO results name categories and images by id: pass --categories (a COCO annotations file, or a "
            "data.yaml / classes.txt)",
            file=file,
        )
    names, entries = _categories_and_images(Path(categories), images)
    data = read_json(results)
    if not isinstance(data, list):
        raise DatasetError(
            "COCO results must be a JSON list of {image_id, category_id, bbox, score}", file=file, record="<root>"
        )
    by_image: dict[int, list[tuple[int, dict]]] = {}
    for k, entry in enumerate(data):
        rid = f"result {k}"
        if not isinstance(entry, dict):
            loader.fault(DatasetError("each result must be an object", file=file, record=rid, field="results"))
            continue
        image_id = entry.get("image_id")
        if not is_id(image_id) or image_id not in entries:
            loader.fault(
                DatasetError(
                    f"unknown image id {image_id!r} (not in {categories})", file=file, record=rid, field="image_id"
                )
            )
            continue
        by_image.setdefault(image_id, []).append((k, entry))
    for image_id, name in sorted(entries.items()):
        rid = f"image id {image_id}"

        def build(image_id=image_id, name=name, rid=rid) -> AnnotatedImage:
            path = (
                confined(images, name, file=str(categories), record=rid, field="file_name")
                if isinstance(name, str)
                else name  # listed from the images folder itself
            )
            size = image_size(path, source=file, record=rid)
            predictions = by_image.get(image_id, [])
            if not predictions:
                raise DatasetError(
                    "no predictions for this image (the detector found nothing, or the results miss it)",
                    file=file,
                    record=rid,
                    field="image_id",
                )
            objects = []
            for k, entry in predictions:
                erid = f"result {k}"
                category = entry.get("category_id")
                if not is_id(category) or category not in names:
                    raise DatasetError(f"unknown category id {category!r}", file=file, record=erid, field="category_id")
                bbox = entry.get("bbox")
                if not (
                    isinstance(bbox, list)
                    and len(bbox) == 4
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
                ):
                    raise DatasetError(
                        f"bbox must be [x, y, width, height] numbers, got {bbox!r}",
                        file=file,
                        record=erid,
                        field="bbox",
                    )
                if "score" not in entry:
                    raise DatasetError("a result needs its score", file=file, record=erid, field="score")
                x, y, w, h = bbox
                objects.append(
                    loader.box(
                        names[category],
                        [x, y, x + w, y + h],
                        size,
                        file=file,
                        record=erid,
                        field="bbox",
                        score=entry["score"],
                    )
                )
            return AnnotatedImage(path, size, loader.objects(objects, file=file, record=rid), file)

        loader.add(file, rid, build)


def _categories_and_images(categories: Path, images: Path) -> tuple[dict[int, str], dict[int, str | Path]]:
    """(category id -> name, image id -> its file: a name relative to the images folder from an
    annotations file, confined to it when read, or a path listed from the folder)."""
    if not categories.is_file():
        raise DatasetError("categories file not found", file=str(categories))
    if categories.suffix == ".json":
        data = read_json(categories)
        file = str(categories)
        if not isinstance(data, dict) or not isinstance(data.get("categories"), list):
            raise DatasetError("a COCO annotations file needs a 'categories' list", file=file, record="<root>")
        names = {
            c["id"]: c["name"]
            for c in data["categories"]
            if isinstance(c, dict) and is_id(c.get("id")) and isinstance(c.get("name"), str)
        }
        entries = {
            e["id"]: e["file_name"]
            for e in data.get("images") or []
            if isinstance(e, dict) and is_id(e.get("id")) and isinstance(e.get("file_name"), str)
        }
        if not entries:
            entries = _numbered_images(images)
        return names, entries
    return dict(enumerate(yolo_class_names(categories))), _numbered_images(images)


def _numbered_images(images: Path) -> dict[int, Path]:
    """Images named by their integer id (COCO's 000000000009.jpg is image 9)."""
    entries = {
        int(p.stem): p.resolve()
        for p in sorted(images.iterdir())
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.stem.isdigit()
    }
    if not entries:
        raise DatasetError(
            "no image named by its integer id (e.g. 000000000009.jpg): pass a COCO annotations file as --categories "
            "to map image ids to files",
            file=str(images),
        )
    return entries
