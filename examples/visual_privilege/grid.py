"""Grid scenes a tiny Qwen3-VL can see, and a simulated detector that can lie about them.

A scene is a 4 x 4 grid of 32 px cells (128 x 128 px) holding 2-5 solid shapes, one per cell: with
Qwen3-VL's 16 px patches merged 2 x 2, each cell is exactly one visual token, so one token carries
one object and a tiny vision tower needs only to tell colours apart and count. Every scene is asked
three questions (QUESTIONS) with answers computed from a list of (label, box) objects, so the same
function answers them from a detector's boxes: a question is *box-right* when the detector's boxes
give the true answer, else *box-wrong* (the boxes lie about it).

The simulated detector at noise rate r, per ground-truth object: missed with probability r, else
its colour mislabelled with probability r by a fixed confusion (red <-> yellow, green <-> blue, as a
detector confuses similar classes); every kept box is jittered by up to 3 px; and Binomial(n, r)
invented boxes (random labels) land in empty cells. Scores follow correctness as a calibrated
detector's do: right boxes Beta(6, 1.5) (mean 0.80), mislabelled and invented ones Beta(2, 2.5)
(mean 0.44). Rate 0 is the ground truth with the same jitter. Predictions are written as a COCO
results file, read back by the package's `coco_results` reader (`load_annotations`).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

GRID, CELL, MARGIN = 4, 32, 3
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 30)}
SHAPES = ("square", "circle")
LABELS = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
CONFUSED = {"red": "yellow", "yellow": "red", "green": "blue", "blue": "green"}
JITTER = 3


@dataclass(frozen=True)
class Box:
    label: str
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels
    score: float = 1.0

    @property
    def colour(self) -> str:
        return self.label.split()[0]

    @property
    def shape(self) -> str:
        return self.label.split()[1]

    @property
    def center_x(self) -> float:
        return (self.box[0] + self.box[2]) / 2


def cell_box(row: int, col: int) -> tuple[int, int, int, int]:
    return (col * CELL + MARGIN, row * CELL + MARGIN, (col + 1) * CELL - MARGIN, (row + 1) * CELL - MARGIN)


def make_scene(rng: random.Random) -> list[Box]:
    """2-5 objects in distinct cells, each a random colour and shape."""
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], rng.randint(2, 5))
    return [Box(f"{rng.choice(list(COLOURS))} {rng.choice(SHAPES)}", cell_box(r, c)) for r, c in cells]


def paint(objects: list[Box]):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (GRID * CELL, GRID * CELL), "white")
    draw = ImageDraw.Draw(image)
    for o in objects:
        x1, y1, x2, y2 = o.box
        (draw.rectangle if o.shape == "square" else draw.ellipse)([x1, y1, x2 - 1, y2 - 1], fill=COLOURS[o.colour])
    return image


# ------------------------------------------------------------------------------------- questions
QUESTIONS = {
    "count": "How many shapes are in the image?",
    "count_red": "How many red shapes are in the image?",
    "exists_yellow": "Is there a yellow shape in the image?",
}
"""One fixed wording per type, every type asked of every scene. A tiny model learns to answer these
from pixels within a few hundred steps; questions that name any of several labels ("Is there a
{label}?") it did not learn in 900 (RESULTS.md: what it took). A detector's lie reaches each:
a missed or invented box changes the count, a red <-> yellow confusion the other two."""
QUESTION_TYPES = tuple(QUESTIONS)


def answer(kind: str, objects: list[Box]) -> str:
    """The answer `objects` give to the question of type `kind`."""
    if kind == "count":
        return str(len(objects))
    if kind == "count_red":
        return str(sum(o.colour == "red" for o in objects))
    if kind == "exists_yellow":
        return "yes" if any(o.colour == "yellow" for o in objects) else "no"
    raise ValueError(f"unknown question type {kind!r}; expected one of {QUESTION_TYPES}")


def questions(objects: list[Box]) -> list[dict]:
    """Every question type, asked of the ground truth."""
    return [{"type": k, "question": q, "answer": answer(k, objects)} for k, q in QUESTIONS.items()]


def majority_accuracy(train: list[dict], heldout: list[dict]) -> dict:
    """The best a text-only model can do: per question template (type), the training set's most
    common answer, scored on the held-out questions; overall and per type."""
    best = {t: Counter(q["answer"] for q in train if q["type"] == t).most_common(1)[0][0] for t in QUESTION_TYPES}
    per_type = {}
    for t in QUESTION_TYPES:
        qs = [q for q in heldout if q["type"] == t]
        if qs:
            per_type[t] = sum(q["answer"] == best[t] for q in qs) / len(qs)
    hits = sum(q["answer"] == best[q["type"]] for q in heldout)
    return {"accuracy": hits / len(heldout), "per_type": per_type, "answers": best}


# ------------------------------------------------------------------------------------- detector
def detect(objects: list[Box], rate: float, rng: random.Random) -> list[Box]:
    """The simulated detector's predictions for one scene (module docstring)."""
    out = []
    for o in objects:
        if rng.random() < rate:
            continue  # missed
        wrong = rng.random() < rate
        label = f"{CONFUSED[o.colour]} {o.shape}" if wrong else o.label
        out.append(Box(label, _jittered(o.box, rng), _score(rng, right=not wrong)))
    taken = {(int(o.box[1]) // CELL, int(o.box[0]) // CELL) for o in objects}
    empty = [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in taken]
    invented = sum(rng.random() < rate for _ in objects)
    for r, c in rng.sample(empty, min(invented, len(empty))):
        out.append(Box(rng.choice(LABELS), _jittered(cell_box(r, c), rng), _score(rng, right=False)))
    return out


def _jittered(box, rng: random.Random) -> tuple[float, ...]:
    size = GRID * CELL
    x1, y1, x2, y2 = (v + rng.randint(-JITTER, JITTER) for v in box)
    return (max(0, x1), max(0, y1), min(size, max(x2, x1 + 4)), min(size, max(y2, y1 + 4)))


def _score(rng: random.Random, right: bool) -> float:
    return round(rng.betavariate(6, 1.5) if right else rng.betavariate(2, 2.5), 3)


# ------------------------------------------------------------------------------------------ files
def write_scenes(root: Path, num_scenes: int, seed: int) -> dict:
    """root/images/grid_NNNN.png, root/annotations.json (COCO ground truth, with the categories and
    images a results file is resolved against) and root/questions.jsonl (the builder's QA lines,
    each with its query for `answer`). Returns the scenes' ground truth by image file name."""
    rng = random.Random(f"grid-scenes:{seed}")
    (root / "images").mkdir(parents=True, exist_ok=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": k + 1, "name": n} for k, n in enumerate(LABELS)]}
    truth, lines = {}, []
    for i in range(num_scenes):
        objects = make_scene(rng)
        name = f"grid_{i:04d}.png"
        paint(objects).save(root / "images" / name)
        coco["images"].append({"id": i + 1, "file_name": name, "width": GRID * CELL, "height": GRID * CELL})
        for o in objects:
            x1, y1, x2, y2 = o.box
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": i + 1,
                    "category_id": LABELS.index(o.label) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
        truth[name] = objects
        for q in questions(objects):
            lines.append({"id": f"{Path(name).stem}-{q['type']}", "image": name, **q})
    (root / "annotations.json").write_text(json.dumps(coco))
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in lines))
    return truth


def write_detections(root: Path, truth: dict[str, list[Box]], rate: float, seed: int) -> tuple[Path, dict]:
    """The simulated detector's predictions for every scene as root/detections_r{rate}.json (COCO
    results); returns the file and the predictions by image file name."""
    rng = random.Random(f"detector:{seed}:{rate}")
    ids = {name: k + 1 for k, name in enumerate(sorted(truth))}
    results, predicted = [], {}
    for name in sorted(truth):
        predicted[name] = detect(truth[name], rate, rng)
        for o in predicted[name]:
            x1, y1, x2, y2 = o.box
            results.append(
                {
                    "image_id": ids[name],
                    "category_id": LABELS.index(o.label) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": o.score,
                }
            )
    path = root / f"detections_r{rate:g}.json"
    path.write_text(json.dumps(results))
    return path, predicted
