"""Pascal VOC XML (docs/design.md §3.2): one file per image, `<object>` with `<name>` and a
`<bndbox>` of inclusive 1-based pixel corners."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

from data_builders.formats.annotations import AnnotatedImage, AnnotationLoader, confined, image_size
from dopd_vl.errors import DatasetError

__all__ = ["load_voc"]


def load_voc(loader: AnnotationLoader, images: Path, annotations: Path) -> None:
    """Every XML file of the annotations folder into `loader`."""
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
            path = confined(images, filename, file=file, record=xml.stem, field="filename")
            size_el = root.find("size")
            if size_el is None:
                raise DatasetError("no <size>", file=file, record=xml.stem, field="size")
            try:
                declared = (int(size_el.findtext("width")), int(size_el.findtext("height")))
            except (TypeError, ValueError):
                raise DatasetError(
                    "<size> needs integer <width> and <height>", file=file, record=xml.stem, field="size"
                ) from None
            size = image_size(path, source=file, record=xml.stem)
            if declared != size:
                raise DatasetError(
                    f"declared size {declared} differs from the image's {size}",
                    file=file,
                    record=xml.stem,
                    field="size",
                )
            objects = []
            for k, obj in enumerate(root.findall("object")):
                rid = f"{xml.stem} object {k}"
                name, box = obj.findtext("name"), obj.find("bndbox")
                if not name or box is None:
                    raise DatasetError("an object needs <name> and <bndbox>", file=file, record=rid, field="object")
                try:
                    x1, y1, x2, y2 = (float(box.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
                except (TypeError, ValueError):
                    raise DatasetError(
                        "<bndbox> needs numeric xmin, ymin, xmax, ymax", file=file, record=rid, field="bndbox"
                    ) from None
                if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
                    raise DatasetError(
                        f"non-finite <bndbox> value ({x1}, {y1}, {x2}, {y2})", file=file, record=rid, field="bndbox"
                    )
                # VOC corners are inclusive 1-based pixels (supervision's x1 - 1): xmax = xmin - 1 is a
                # box of zero width, smaller is a swapped box.
                objects.append(loader.box(name, [x1 - 1, y1 - 1, x2, y2], size, file=file, record=rid, field="bndbox"))
            return AnnotatedImage(path, size, loader.objects(objects, file=file, record=xml.stem), str(annotations))

        loader.add(file, xml.stem, build)
