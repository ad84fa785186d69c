"""Detector predictions into grounding datasets (docs/design.md §3.2): YOLO label files with a
confidence column, COCO results JSON and `sv.Detections` with confidence keep each box's score;
`--min-score` drops and counts; every fault of a real prediction file is named (fail) or listed
in OUT.skipped.jsonl (skip), and a failed build leaves no output."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from data_builders import annotated_image_from_detections, build_grounding, get_format, load_annotations
from dopd_vl.cli import main
from dopd_vl.data.schema import validate_record
from dopd_vl.data.sources import load_records
from dopd_vl.errors import DatasetError

from conftest import COCO128

IMAGES = COCO128 / "images" / "train2017"
LABELS = COCO128 / "labels" / "train2017"
NAMES = COCO128 / "coco128.yaml"
STEMS = sorted(p.stem for p in LABELS.glob("*.txt"))[:6]

pytestmark = pytest.mark.skipif(not IMAGES.is_dir(), reason="../shared/data/coco128 is not beside the clone")


def _score(stem: str, n: int) -> float:
    """A made-up confidence per box: 0.2, 0.35, ... 0.95 cycling."""
    return round(0.2 + 0.15 * ((int(stem) + n) % 6), 2)


def _predictions(tmp_path):
    """COCO128's first 6 images with their labels as YOLO predictions (a sixth column) and as a COCO
    results JSON: the same boxes and scores."""
    images, labels = tmp_path / "images", tmp_path / "pred_labels"
    images.mkdir()
    labels.mkdir()
    results, expected = [], {}
    for stem in STEMS:
        (images / f"{stem}.jpg").symlink_to(IMAGES / f"{stem}.jpg")
        W, H = Image.open(IMAGES / f"{stem}.jpg").size
        rows = []
        for n, line in enumerate((LABELS / f"{stem}.txt").read_text().splitlines()):
            c, xc, yc, w, h = line.split()
            score = _score(stem, n)
            rows.append(f"{line} {score}")
            x, y, bw, bh = (float(xc) - float(w) / 2) * W, (float(yc) - float(h) / 2) * H, float(w) * W, float(h) * H
            results.append({"image_id": int(stem), "category_id": int(c), "bbox": [x, y, bw, bh], "score": score})
            expected.setdefault(stem, []).append(score)
        (labels / f"{stem}.txt").write_text("\n".join(rows) + "\n")
    (tmp_path / "results.json").write_text(json.dumps(results))
    return images, labels, tmp_path / "results.json", expected


def _build(fmt, images, annotations, out, *extra):
    args = ["build", "grounding", "--format", fmt, "--images", str(images), "--annotations", str(annotations)]
    return main([*args, "--out", str(out), "--objects", "all", *extra])


def _scores_by_image(out) -> dict[str, list[float]]:
    by_image = {}
    for record in load_records(out):
        validate_record(record)
        stem = record["prompt"][0]["content"][0]["image"].rsplit("/", 1)[-1].split(".")[0]
        by_image[stem] = sorted(o["score"] for o in record["privileged"]["objects"])
    return by_image


def test_yolo_predictions_and_coco_results_keep_every_score_and_min_score_drops_and_counts(tmp_path, capsys):
    images, labels, results, expected = _predictions(tmp_path)
    yolo, coco = tmp_path / "yolo.jsonl", tmp_path / "coco.jsonl"
    assert _build("yolo", images, labels, yolo, "--classes", str(NAMES)) == 0
    assert _build("coco_results", images, results, coco, "--categories", str(NAMES)) == 0
    want = {stem: sorted(scores) for stem, scores in expected.items()}
    assert _scores_by_image(yolo) == want == _scores_by_image(coco)
    capsys.readouterr()
    kept = tmp_path / "kept.jsonl"
    assert _build("coco_results", images, results, kept, "--categories", str(NAMES), "--min-score", "0.5") == 0
    printed = capsys.readouterr().out
    dropped = sum(s < 0.5 for scores in expected.values() for s in scores)
    assert dropped and f"boxes below --min-score dropped {dropped}," in printed
    assert _scores_by_image(kept) == {
        stem: [s for s in scores if s >= 0.5] for stem, scores in want.items() if any(s >= 0.5 for s in scores)
    }


def test_sv_detections_confidence_becomes_the_score(tmp_path):
    import supervision as sv

    detections = sv.Detections(
        xyxy=np.array([[10, 10, 50, 60], [100, 40, 200, 120]], dtype=float),
        class_id=np.array([0, 1]),
        confidence=np.array([0.9, 0.3]),
    )
    image = annotated_image_from_detections(IMAGES / f"{STEMS[0]}.jpg", detections, ["cat", "dog"], min_score=0.5)
    assert [(o["label"], o["score"]) for o in image.objects] == [("cat", 0.9)]
    out = tmp_path / "d.jsonl"
    build_grounding(
        [annotated_image_from_detections(IMAGES / f"{STEMS[0]}.jpg", detections, ["cat", "dog"])],
        out,
        objects="all",
        privileged_format="qwen3vl_grounding_scored",
    )
    record = load_records(out)[0]
    assert '"score": 0.9' in record["privileged_context"] and '"score": 0.3' in record["privileged_context"]
    assert record["privileged_context"].startswith("Detected objects")
    plain = get_format("qwen3vl_grounding").render(record["privileged"])
    assert "score" not in plain  # the default format shows none


def _edit_results(results, edit):
    data = json.loads(results.read_text())
    edit(data)
    results.write_text(json.dumps(data))


FAULTS = {
    "non-finite score": (
        lambda r: _edit_results(r, lambda d: d[0].update(score=float("nan"))),
        ["record result 0", "field score", "finite"],
    ),
    "score above 1": (lambda r: _edit_results(r, lambda d: d[1].update(score=1.5)), ["record result 1", "field score"]),
    "unknown image id": (
        lambda r: _edit_results(r, lambda d: d[0].update(image_id=999999)),
        ["record result 0", "field image_id", "unknown image id 999999"],
    ),
    "unknown category id": (
        lambda r: _edit_results(r, lambda d: d[0].update(category_id=500)),
        ["record result 0", "field category_id"],
    ),
    "box of negative size": (
        lambda r: _edit_results(r, lambda d: d[0].update(bbox=[10, 10, -5, 20])),
        ["record result 0", "field bbox", "negative width"],
    ),
    "image without predictions": (
        lambda r: _edit_results(
            r, lambda d: d.__setitem__(slice(None), [e for e in d if e["image_id"] != int(STEMS[1])])
        ),
        [f"record image id {int(STEMS[1])}", "field image_id", "no predictions"],
    ),
    "duplicate prediction": (
        lambda r: _edit_results(r, lambda d: d.append(dict(d[0]))),
        [f"record image id {int(STEMS[0])}", "field bbox", "duplicate prediction"],
    ),
}


@pytest.mark.parametrize("case", FAULTS, ids=list(FAULTS))
def test_each_coco_results_fault_is_named_or_skipped_and_nothing_half_written(tmp_path, case, capsys):
    images, _, results, _ = _predictions(tmp_path)
    edit, expected = FAULTS[case]
    edit(results)
    out = tmp_path / "out.jsonl"
    capsys.readouterr()
    assert _build("coco_results", images, results, out, "--categories", str(NAMES)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert all(part in err for part in expected), err
    assert not out.exists() and not list(tmp_path.glob(".out.jsonl.*"))
    assert _build("coco_results", images, results, out, "--categories", str(NAMES), "--on-error", "skip") == 0
    skipped = [json.loads(line) for line in (tmp_path / "out.skipped.jsonl").read_text().splitlines()]
    assert skipped and all(part in skipped[0]["reason"] for part in expected[:2] if part.startswith("field"))


def test_a_yolo_file_with_mixed_row_widths_is_named_with_its_line(tmp_path, capsys):
    images, labels, _, _ = _predictions(tmp_path)
    path = labels / f"{STEMS[2]}.txt"
    rows = path.read_text().splitlines()
    path.write_text("\n".join([rows[0], " ".join(rows[0].split()[:5]), *rows[1:]]) + "\n")
    capsys.readouterr()
    assert _build("yolo", images, labels, tmp_path / "o.jsonl", "--classes", str(NAMES)) == 1
    err = capsys.readouterr().err
    assert (
        f"{STEMS[2]}.txt" in err and "record line 2" in err and "field columns" in err and "has the confidence" in err
    )


def test_the_schema_checks_box_scores():
    record = {
        "id": "r",
        "prompt": [{"role": "user", "content": "q"}],
        "privileged": {"objects": [{"label": "cat", "bbox_px": [0, 0, 1, 1], "score": 0.5}]},
    }
    validate_record(record)
    for bad in (1.5, -0.1, math.inf, "high", True):
        record["privileged"]["objects"][0]["score"] = bad
        with pytest.raises(DatasetError, match=r"field privileged\.objects\[0\]\.score"):
            validate_record(record)


def test_coco_results_need_their_categories(tmp_path):
    images, _, results, _ = _predictions(tmp_path)
    with pytest.raises(DatasetError, match="--categories"):
        load_annotations("coco_results", images, results)
