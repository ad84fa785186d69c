"""COCO JSON detections (docs/design.md §3.2): `images`, `annotations` with [x, y, width, height]
pixel boxes, `categories` by id. Crowd annotations are kept as boxes, as supervision's loader does."""

from __future__ import annotations

from pathlib import Path

from data_builders.formats.annotations import (
    AnnotatedImage,
    AnnotationLoader,
    confined,
    image_size,
    is_id,
    read_json,
)
from dopd_vl.errors import DatasetError

__all__ = ["load_coco"]


def load_coco(loader: AnnotationLoader, images: Path, annotations: Path) -> None:
    """Every image of a COCO file into `loader` (a fault in the file as a whole stops the load)."""
    data = read_json(annotations)
    file = str(annotations)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key) if isinstance(data, dict) else None, list):
            raise DatasetError(f"COCO file has no {key!r} list", file=file, record="<root>", field=key)
    categories = {}
    for c in data["categories"]:
        if not isinstance(c, dict) or not is_id(c.get("id")) or not isinstance(c.get("name"), str):
            # Not fatal in skip mode: annotations that use it are then "unknown category" faults.
            loader.fault(
                DatasetError(
                    "each category needs an integer id and a name",
                    file=file,
                    record=f"category {c.get('id') if isinstance(c, dict) else c}",
                    field="categories",
                )
            )
            continue
        categories[c["id"]] = c["name"]
    by_image: dict[int, list] = {}
    orphans = []
    entries = {}
    for entry in data["images"]:
        if isinstance(entry, dict) and is_id(entry.get("id")) and entry["id"] not in entries:
            entries[entry["id"]] = entry
    for a in data["annotations"]:
        image_id = a.get("image_id") if isinstance(a, dict) else None
        (by_image.setdefault(image_id, []) if is_id(image_id) and image_id in entries else orphans).append(a)
    seen_ids, seen_names = set(), set()
    for entry in data["images"]:
        rid = f"image id {entry.get('id') if isinstance(entry, dict) else entry}"

        def build(entry=entry, rid=rid) -> AnnotatedImage:
            if not isinstance(entry, dict) or not is_id(entry.get("id")) or not isinstance(entry.get("file_name"), str):
                raise DatasetError(
                    "each image needs an integer id and a file_name", file=file, record=rid, field="images"
                )
            if entry["id"] in seen_ids or entry["file_name"] in seen_names:
                raise DatasetError("duplicate image id or file_name", file=file, record=rid, field="images.id")
            seen_ids.add(entry["id"])
            seen_names.add(entry["file_name"])
            path = confined(images, entry["file_name"], file=file, record=rid, field="file_name")
            size = image_size(path, source=file, record=rid)
            declared = (entry.get("width"), entry.get("height"))
            if declared != (None, None) and tuple(declared) != size:
                raise DatasetError(
                    f"declared size {declared} differs from the image's {size}",
                    file=file,
                    record=rid,
                    field="width/height",
                )
            objects = []
            for a in by_image.get(entry["id"], []):
                arid = f"annotation id {a.get('id')}"
                if not is_id(a.get("category_id")) or a["category_id"] not in categories:
                    raise DatasetError(
                        f"unknown category id {a.get('category_id')!r}", file=file, record=arid, field="category_id"
                    )
                bbox = a.get("bbox")
                if not (isinstance(bbox, list) and len(bbox) == 4):
                    raise DatasetError(
                        "bbox must be [x, y, width, height] numbers", file=file, record=arid, field="bbox"
                    )
                if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
                    raise DatasetError(f"bbox values must be numbers, got {bbox}", file=file, record=arid, field="bbox")
                x, y, w, h = bbox
                objects.append(
                    loader.box(
                        categories[a["category_id"]], [x, y, x + w, y + h], size, file=file, record=arid, field="bbox"
                    )
                )
            # Crowd annotations are kept as boxes, as supervision's loader does.
            return AnnotatedImage(path, size, loader.objects(objects, file=file, record=rid), file)

        loader.add(file, rid, build)
    for a in orphans:  # after the images, so that an image's own fault is named first
        rid = f"annotation id {a.get('id') if isinstance(a, dict) else a}"
        field = "image_id" if isinstance(a, dict) else "annotations"
        loader.fault(
            DatasetError(
                f"unknown image id {a.get('image_id')!r}" if isinstance(a, dict) else "an annotation must be an object",
                file=file,
                record=rid,
                field=field,
            )
        )
