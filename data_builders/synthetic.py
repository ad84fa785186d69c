"""Synthetic annotated data that the package can generate anywhere (no licence questions):
scenes of coloured shapes with exact boxes written as COCO JSON, and GSM8K-style arithmetic
word problems with calculator annotations. They feed the real builders in the demo and tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

__all__ = ["COLORS", "SHAPES", "make_scene", "write_shape_scenes", "write_arithmetic_problems"]

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220)}
SHAPES = ("square", "circle")


def make_scene(rng: random.Random, width: int = 160, height: int = 120):
    """A white canvas with 2-5 non-overlapping coloured shapes; returns the image and exact boxes."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    boxes: list[tuple[str, list[int]]] = []
    for _ in range(rng.randint(2, 5)):
        for _attempt in range(50):
            size = rng.randint(18, 34)
            x1, y1 = rng.randint(0, width - size), rng.randint(0, height - size)
            box = [x1, y1, x1 + size, y1 + size]
            if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for _, b in boxes):
                break
        else:
            continue
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        (draw.rectangle if shape == "square" else draw.ellipse)(
            [box[0], box[1], box[2] - 1, box[3] - 1], fill=COLORS[color]
        )
        boxes.append((f"{color} {shape}", box))
    return image, boxes


def write_shape_scenes(
    root: str | Path, num_images: int = 16, seed: int = 0, width: int = 160, height: int = 120
) -> tuple[Path, Path]:
    """PNG scenes under root/images and their boxes as root/annotations.json (COCO)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    labels = [f"{c} {s}" for c in COLORS for s in SHAPES]
    coco = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": n} for i, n in enumerate(labels)]}
    for i in range(num_images):
        image, boxes = make_scene(rng, width, height)
        name = f"scene_{i:03d}.png"
        image.save(root / "images" / name)
        coco["images"].append({"id": i + 1, "file_name": name, "width": image.size[0], "height": image.size[1]})
        for label, (x1, y1, x2, y2) in boxes:
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": i + 1,
                    "category_id": labels.index(label) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    (root / "annotations.json").write_text(json.dumps(coco))
    return root / "images", root / "annotations.json"


def write_arithmetic_problems(path: str | Path, num_problems: int = 32, seed: int = 0) -> Path:
    """Two-step word problems in GSM8K's format (`<<expr=result>>` steps, `#### N`)."""
    rng = random.Random(seed)
    items = ["apples", "books", "coins", "stamps", "marbles"]
    names = ["Ana", "Ben", "Caro", "Dev", "Eli"]
    lines = []
    for i in range(num_problems):
        name, item = rng.choice(names), rng.choice(items)
        a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 9)
        first, total = a * b, a * b + c
        question = (
            f"{name} has {a} boxes with {b} {item} each and finds {c} more {item}. How many {item} does {name} have?"
        )
        answer = (
            f"The boxes hold {a}*{b}=<<{a}*{b}={first}>>{first} {item}.\nWith the extra ones that is "
            f"{first}+{c}=<<{first}+{c}={total}>>{total} {item}.\n#### {total}"
        )
        lines.append(json.dumps({"id": f"arith-{i:03d}", "question": question, "answer": answer}))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
