"""Grounding builder on COCO128 (../shared, read in place) and on every malformed input we know."""

import json
import shutil
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_builders.grounding import annotated_image_from_detections, build_grounding, load_annotations
from data_builders.privileged import get_format, register_format
from dopd_vl.cli import main
from dopd_vl.data.schema import validate_record
from dopd_vl.data.sources import load_records
from dopd_vl.errors import DatasetError

from conftest import COCO128, REPO

IMAGES = COCO128 / "images" / "train2017"
LABELS = COCO128 / "labels" / "train2017"
CLASSES = (COCO128 / "classes.txt").read_text().split("\n")

pytestmark = [
    pytest.mark.skipif(not IMAGES.is_dir(), reason="../shared/data/coco128 is not beside the clone"),
    pytest.mark.xdist_group("coco128"),
]  # with --dist loadgroup: one worker builds its fixture


def _yolo_boxes_px(stem):
    """The test's own reading of a YOLO label file: (label, [x1, y1, x2, y2] pixels, (W, H))."""
    W, H = Image.open(IMAGES / f"{stem}.jpg").size
    out = []
    path = LABELS / f"{stem}.txt"
    for line in path.read_text().splitlines() if path.exists() else []:
        c, xc, yc, w, h = line.split()
        xc, yc, w, h = float(xc) * W, float(yc) * H, float(w) * W, float(h) * H
        out.append((CLASSES[int(c)], [xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2], (W, H)))
    return out


@pytest.fixture(scope="session")  # once per worker: xdist may interleave other modules between its tests
def coco128_records(tmp_path_factory):
    out = tmp_path_factory.mktemp("g") / "coco128.jsonl"
    assert (
        main(
            [
                "build",
                "grounding",
                "--format",
                "yolo",
                "--images",
                str(IMAGES),
                "--annotations",
                str(LABELS),
                "--classes",
                str(COCO128 / "coco128.yaml"),
                "--out",
                str(out),
                "--objects",
                "all",
            ]
        )
        == 0
    )
    return out, load_records(out)


def test_coco128_boxes_equal_our_own_computation_from_the_label_files(coco128_records):
    _, records = coco128_records
    by_image = {}
    for r in records:
        by_image.setdefault(Path(r["prompt"][0]["content"][0]["image"]).stem, r)
    assert len(by_image) == 126  # two images have no label file
    total = 0
    for stem, record in by_image.items():
        expected = sorted(
            (lab, [min(1000, max(0, round(v / s * 1000))) for v, s in zip(box, (W, H, W, H))])
            for lab, box, (W, H) in _yolo_boxes_px(stem)
        )
        rendered = json.loads(record["privileged_context"].split(": ", 1)[1])
        got = sorted((o["label"], o["bbox_2d"]) for o in rendered)
        assert len(got) == len(expected)
        for (la, ba), (lb, bb) in zip(got, expected):
            assert la == lb and all(abs(a - b) <= 1 for a, b in zip(ba, bb)), (stem, ba, bb)
        total += len(got)
    assert total == 929


def test_coco128_counting_answers_equal_label_counts(coco128_records):
    _, records = coco128_records
    counting = [r for r in records if r["meta"]["question_type"] == "count"]
    assert len(counting) == 126
    for r in counting:
        stem = Path(r["prompt"][0]["content"][0]["image"]).stem
        counts = Counter(lab for lab, _, _ in _yolo_boxes_px(stem))
        asked = r["prompt"][0]["content"][1]["text"].removeprefix("How many ").removesuffix(" are in the image?")
        irregular = {("person", "people"), ("knife", "knives"), ("mouse", "mice"), ("broccoli", "heads of broccoli")}
        irregular |= {("tv", "TVs")}
        labels = [
            lab
            for lab in counts
            if asked.startswith(lab) or (asked.startswith(lab[:-1]) and lab.endswith("y")) or (lab, asked) in irregular
        ]
        assert len(labels) == 1, (asked, counts)
        assert r["answer"] == str(counts[labels[0]])


def test_records_validate_and_load_with_datasets(coco128_records):
    out, records = coco128_records
    for i, r in enumerate(records):
        validate_record(r, index=i)
        assert (out.parent / r["prompt"][0]["content"][0]["image"]).resolve().is_file()  # relative to the output file
    import datasets

    ds = datasets.load_dataset("json", data_files=str(out), split="train")
    assert len(ds) == len(records) and set(ds.column_names) >= {"id", "prompt", "privileged_context"}
    types = Counter(r["meta"]["question_type"] for r in records)
    assert types["count"] == types["exists"] == 126 and types["relation"] > 0
    for r in records:  # synthesised answers are verifiable: yes/no or a count
        assert r["answer"] in ("yes", "no") or r["answer"].isdigit()


def test_the_builder_trusts_its_image_folder_so_its_output_needs_no_configuration(
    coco128_records, tmp_path, monkeypatch
):
    from dopd_vl.data.image_roots import image_roots, trusted_image_roots
    from dopd_vl.data.images import image_parts, load_image
    from dopd_vl.data.sources import records_root
    from dopd_vl.errors import ImageOutsideRoots

    out, records = coco128_records  # the output lies in a temporary folder, its images in ../shared
    assert IMAGES.resolve() in trusted_image_roots()
    (ref,) = image_parts(records[0])
    assert (
        load_image(ref, image_roots(records_root(out)), records[0]["id"]).size
        == Image.open(IMAGES / Path(ref).name).size
    )
    monkeypatch.setenv(
        "DOPD_VL_CONFIG_DIR", str(tmp_path / "another_user")
    )  # the same files on a machine whose builder never read them
    with pytest.raises(ImageOutsideRoots, match=rf"record {records[0]['id']}, field prompt.image: .*data.image_roots"):
        load_image(ref, image_roots(records_root(out)), records[0]["id"])
    assert load_image(ref, image_roots(records_root(out), [IMAGES]), records[0]["id"])  # the recipe's data.image_roots


def test_query_related_objects_by_default(tmp_path):
    images = load_annotations("yolo", IMAGES, LABELS, COCO128 / "coco128.yaml")
    report = build_grounding(images[:10], tmp_path / "q.jsonl")
    for r in report.records:
        labels = {o["label"] for o in r["privileged"]["objects"]}
        question = r["prompt"][0]["content"][1]["text"]
        if r["meta"]["question_type"] == "exists" and r["answer"] == "no":
            assert len(r["privileged"]["objects"]) == sum(
                1 for _ in _yolo_boxes_px(Path(r["prompt"][0]["content"][0]["image"]).stem)
            )
        else:
            assert all(lab in question or (lab, "people") == ("person", question.split()[2]) for lab in labels), (
                labels,
                question,
            )
            stem = Path(r["prompt"][0]["content"][0]["image"]).stem
            assert len(r["privileged"]["objects"]) == sum(1 for lab, _, _ in _yolo_boxes_px(stem) if lab in labels)


def test_builds_are_deterministic_for_a_seed(tmp_path):
    images = load_annotations("yolo", IMAGES, LABELS, COCO128 / "coco128.yaml")
    a = build_grounding(images, tmp_path / "a.jsonl", seed=3).records
    b = build_grounding(images, tmp_path / "b.jsonl", seed=3).records
    c = build_grounding(images, tmp_path / "c.jsonl", seed=4).records
    assert a == b and a != c


# ------------------------------------------------------------------ the same annotations, 3 ways
def _write_coco_and_voc(root: Path, stems: list[str]):
    """Integer pixel boxes from COCO128 written as COCO JSON and Pascal VOC XML (1-based)."""
    coco = {
        "images": [],
        "annotations": [],
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES) if n],
    }
    cat_id = {n: i + 1 for i, n in enumerate(CLASSES) if n}
    (root / "voc").mkdir()
    for image_id, stem in enumerate(stems, start=1):
        boxes = _yolo_boxes_px(stem)
        W, H = boxes[0][2]
        coco["images"].append({"id": image_id, "file_name": f"{stem}.jpg", "width": W, "height": H})
        ann = ET.Element("annotation")
        ET.SubElement(ann, "filename").text = f"{stem}.jpg"
        size = ET.SubElement(ann, "size")
        for tag, v in (("width", W), ("height", H), ("depth", 3)):
            ET.SubElement(size, tag).text = str(v)
        for label, box, _ in boxes:
            x1, y1, x2, y2 = (
                max(0, round(box[0])),
                max(0, round(box[1])),
                min(W, round(box[2])),
                min(H, round(box[3])),
            )
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": cat_id[label],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
            obj = ET.SubElement(ann, "object")
            ET.SubElement(obj, "name").text = label
            bnd = ET.SubElement(obj, "bndbox")
            for tag, v in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
                ET.SubElement(bnd, tag).text = str(v)
        ET.ElementTree(ann).write(root / "voc" / f"{stem}.xml")
    (root / "coco.json").write_text(json.dumps(coco))


def test_coco_json_and_pascal_voc_build_identical_records(tmp_path):
    stems = sorted(p.stem for p in LABELS.glob("*.txt") if (IMAGES / f"{p.stem}.jpg").exists())[:24]
    _write_coco_and_voc(tmp_path, stems)
    outs = {}
    for fmt, ann in (("coco", tmp_path / "coco.json"), ("voc", tmp_path / "voc")):
        out = tmp_path / f"{fmt}.jsonl"
        assert (
            main(
                [
                    "build",
                    "grounding",
                    "--format",
                    fmt,
                    "--images",
                    str(IMAGES),
                    "--annotations",
                    str(ann),
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        outs[fmt] = [{**r, "meta": {k: v for k, v in r["meta"].items() if k != "source"}} for r in load_records(out)]
    assert len(outs["coco"]) >= 48
    assert outs["coco"] == outs["voc"]


def test_detections_from_a_detector_enter_through_the_python_api(tmp_path):
    import supervision as sv

    stem = "000000000009"
    boxes = _yolo_boxes_px(stem)
    names = sorted({lab for lab, _, _ in boxes})
    det = sv.Detections(
        xyxy=np.array([b for _, b, _ in boxes], dtype=float),
        class_id=np.array([names.index(lab) for lab, _, _ in boxes]),
    )
    image = annotated_image_from_detections(IMAGES / f"{stem}.jpg", det, names)
    report = build_grounding([image], tmp_path / "det.jsonl", objects="all")
    assert Counter(o["label"] for o in report.records[0]["privileged"]["objects"]) == Counter(
        lab for lab, _, _ in boxes
    )
    with pytest.raises(DatasetError, match="field class_id"):
        annotated_image_from_detections(IMAGES / f"{stem}.jpg", det, names[:1])


# ------------------------------------------------------------------------------ custom formats
def test_custom_format_from_python_and_from_the_cli(tmp_path, monkeypatch):
    from examples.custom_format import MarkdownBoxes

    register_format(MarkdownBoxes(), overwrite=True)
    images = load_annotations("yolo", IMAGES, LABELS, COCO128 / "coco128.yaml")[:3]
    report = build_grounding(images, tmp_path / "md.jsonl", privileged_format="markdown_boxes")
    assert report.records[0]["privileged_context"].startswith("Objects in the image (0-1000 coordinates):\n| object |")
    monkeypatch.chdir(REPO)
    out = tmp_path / "cli.jsonl"
    assert (
        main(
            [
                "build",
                "grounding",
                "--format",
                "yolo",
                "--images",
                str(IMAGES),
                "--annotations",
                str(LABELS),
                "--out",
                str(out),
                "--privileged-format",
                "examples.custom_format:MarkdownBoxes",
            ]
        )
        == 0
    )
    record = load_records(out)[0]
    assert (
        "| object | x1 | y1 | x2 | y2 |" in record["privileged_context"]
        and record["privileged"]["format"] == "markdown_boxes"
    )


def test_qwen25vl_coordinates_are_pixels_of_the_resized_image():
    from qwen_vl_utils import smart_resize

    privileged = {"image_size": [640, 480], "objects": [{"label": "bowl", "bbox_px": [0, 0, 640, 480]}]}
    h, w = smart_resize(480, 640, factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
    box = json.loads(get_format("qwen25vl_grounding").render(privileged).split(": ", 1)[1])[0]["bbox_2d"]
    assert box == [0, 0, w, h]


# ----------------------------------------------------------------------------- malformed input
@pytest.fixture
def mini(tmp_path):
    """Two generated images with COCO, YOLO and VOC annotations that build fine."""
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    for i, (w, h) in enumerate([(64, 48), (80, 60)]):
        Image.fromarray(np.full((h, w, 3), 40 * (i + 1), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
    coco = {
        "images": [
            {"id": 1, "file_name": "im0.png", "width": 64, "height": 48},
            {"id": 2, "file_name": "im1.png", "width": 80, "height": 60},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [2, 3, 20, 10]},
            {"id": 11, "image_id": 2, "category_id": 2, "bbox": [5, 5, 30, 30]},
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    (root / "coco.json").write_text(json.dumps(coco))
    (root / "labels").mkdir()
    (root / "labels" / "im0.txt").write_text("0 0.5 0.5 0.25 0.25\n")
    (root / "labels" / "im1.txt").write_text("1 0.3 0.3 0.2 0.2\n")
    (root / "classes.txt").write_text("cat\ndog\n")
    (root / "voc").mkdir()
    for i, (w, h, name) in enumerate([(64, 48, "cat"), (80, 60, "dog")]):
        (root / "voc" / f"im{i}.xml").write_text(
            f"<annotation><filename>im{i}.png</filename><size><width>{w}</width><height>{h}</height><depth>3</depth></size>"
            f"<object><name>{name}</name><bndbox><xmin>3</xmin><ymin>4</ymin><xmax>20</xmax><ymax>15</ymax></bndbox></object></annotation>"
        )
    out = tmp_path / "out"
    out.mkdir()
    (out / "data.jsonl").write_text("PREVIOUS CONTENT\n")
    return root, out / "data.jsonl"


def _coco(root, edit):
    data = json.loads((root / "coco.json").read_text())
    edit(data)
    (root / "coco.json").write_text(json.dumps(data))


def _set(path, text):
    Path(path).write_text(text)


MALFORMED = {
    "missing annotation file": ("coco", lambda r: (r / "coco.json").unlink(), ["coco.json", "annotations not found"]),
    "invalid json": (
        "coco",
        lambda r: _set(r / "coco.json", '{"images": [}'),
        ["coco.json", "record line 1: invalid JSON: Expecting value: line 1 column 13 (char 12)"],
    ),
    "invalid xml": (
        "voc",
        lambda r: _set(r / "voc" / "im1.xml", "<annotation><size>"),
        ["im1.xml", "record im1", "field xml"],
    ),
    "coco without images": ("coco", lambda r: _coco(r, lambda d: d.pop("images")), ["coco.json", "field images"]),
    "coco without annotations": (
        "coco",
        lambda r: _coco(r, lambda d: d.pop("annotations")),
        ["coco.json", "field annotations"],
    ),
    "unknown image id": (
        "coco",
        lambda r: _coco(r, lambda d: d["annotations"][1].update(image_id=99)),
        ["coco.json", "record annotation id 11", "field image_id"],
    ),
    "unknown category id": (
        "coco",
        lambda r: _coco(r, lambda d: d["annotations"][0].update(category_id=7)),
        ["record annotation id 10", "field category_id"],
    ),
    "negative width": (
        "coco",
        lambda r: _coco(r, lambda d: d["annotations"][0].update(bbox=[2, 3, -1, 10])),
        ["record annotation id 10", "field bbox", "negative width"],
    ),
    "non-finite coco bbox": (
        "coco",
        lambda r: _set(r / "coco.json", (r / "coco.json").read_text().replace('"bbox": [2', '"bbox": [NaN', 1)),
        ["record annotation id 10", "field bbox", "non-finite"],
    ),
    "non-finite yolo value": (
        "yolo",
        lambda r: _set(r / "labels" / "im0.txt", "0 nan 0.5 0.2 0.2\n"),
        ["im0.txt", "record line 1", "field x_center", "non-finite"],
    ),
    "non-finite voc value": (
        "voc",
        lambda r: _set(
            r / "voc" / "im0.xml", (r / "voc" / "im0.xml").read_text().replace("<ymax>15</ymax>", "<ymax>inf</ymax>")
        ),
        ["im0.xml", "record im0 object 0", "field bndbox", "non-finite"],
    ),
    "zero width with --degenerate fail": (
        "coco",
        lambda r: _coco(r, lambda d: d["annotations"][0].update(bbox=[2, 3, 0, 10])),
        ["record annotation id 10", "field bbox", "zero width"],
    ),
    "non-positive height (voc)": (
        "voc",
        lambda r: _set(
            r / "voc" / "im0.xml", (r / "voc" / "im0.xml").read_text().replace("<ymax>15</ymax>", "<ymax>2</ymax>")
        ),
        ["im0.xml", "record im0 object 0", "field bndbox"],
    ),
    "box far outside": (
        "coco",
        lambda r: _coco(r, lambda d: d["annotations"][1].update(bbox=[70, 5, 60, 30])),
        ["record annotation id 11", "field bbox", "outside"],
    ),
    "yolo field count": (
        "yolo",
        lambda r: _set(r / "labels" / "im1.txt", "1 0.3 0.3 0.2\n"),
        [
            "im1.txt",
            "record line 1",
            "field columns: expected 5 columns (class x_center y_center width height) or 6",
            "got 4",
        ],
    ),
    "yolo non-numeric": (
        "yolo",
        lambda r: _set(r / "labels" / "im1.txt", "1 0.3 abc 0.2 0.2\n"),
        ["im1.txt", "record line 1", "field y_center"],
    ),
    "yolo class out of range": (
        "yolo",
        lambda r: _set(r / "labels" / "im0.txt", "0 0.5 0.5 0.2 0.2\n5 0.5 0.5 0.2 0.2\n"),
        ["im0.txt", "record line 2", "field class"],
    ),
    "yolo coordinates outside [0, 1]": (
        "yolo",
        lambda r: _set(r / "labels" / "im0.txt", "0 1.5 0.5 0.2 0.2\n"),
        ["im0.txt", "record line 1", "field x_center"],
    ),
    "voc without size": (
        "voc",
        lambda r: _set(r / "voc" / "im0.xml", "<annotation><filename>im0.png</filename></annotation>"),
        ["im0.xml", "record im0", "field size"],
    ),
    "missing image": (
        "coco",
        lambda r: (r / "images" / "im1.png").unlink(),
        ["coco.json", "record image id 2", "field image", "not found"],
    ),
    "unreadable image": (
        "coco",
        lambda r: _set(r / "images" / "im1.png", "not an image"),
        ["record image id 2", "field image", "unreadable"],
    ),
    "truncated image": (
        "voc",
        lambda r: (r / "images" / "im0.png").write_bytes((r / "images" / "im0.png").read_bytes()[:60]),
        ["im0.xml", "record im0", "field image"],
    ),
    "path escaping the root": (
        "coco",
        lambda r: _coco(r, lambda d: d["images"][0].update(file_name="../../out/secret.png")),
        ["record image id 1", "field file_name", "escapes"],
    ),
    "absolute path": (
        "voc",
        lambda r: _set(
            r / "voc" / "im0.xml",
            (r / "voc" / "im0.xml").read_text().replace("<filename>im0.png", f"<filename>{r / 'images' / 'im0.png'}"),
        ),
        ["im0.xml", "field filename", "absolute"],
    ),
    "empty dataset": (
        "coco",
        lambda r: _coco(r, lambda d: d.update(images=[], annotations=[])),
        ["coco.json", "empty"],
    ),
    "duplicate image ids": (
        "coco",
        lambda r: _coco(r, lambda d: d["images"][1].update(id=1)),
        ["coco.json", "record image id 1", "duplicate"],
    ),
}


def _cli_args(fmt, root, out, extra=()):
    ann = {"coco": root / "coco.json", "yolo": root / "labels", "voc": root / "voc"}[fmt]
    return [
        "build",
        "grounding",
        "--format",
        fmt,
        "--images",
        str(root / "images"),
        "--annotations",
        str(ann),
        "--out",
        str(out),
        *extra,
    ]


@pytest.mark.parametrize("fmt", ["coco", "yolo", "voc"])
def test_the_mini_dataset_builds_in_every_format(mini, fmt):
    root, out = mini
    assert main(_cli_args(fmt, root, out)) == 0
    assert len(load_records(out)) >= 2


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_input_fails_with_one_clear_line_and_touches_nothing(mini, case, capsys):
    root, out = mini
    fmt, break_it, expected = MALFORMED[case]
    break_it(root)
    before = sorted(p.name for p in out.parent.iterdir())
    assert main(_cli_args(fmt, root, out, ["--degenerate", "fail"] if "--degenerate fail" in case else [])) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    for fragment in expected:
        assert fragment in err, (fragment, err)
    assert out.read_text() == "PREVIOUS CONTENT\n"
    assert sorted(p.name for p in out.parent.iterdir()) == before


def test_questions_file_duplicate_ids_and_skip_mode(mini, capsys):
    root, out = mini
    qa = root / "qa.jsonl"
    qa.write_text(
        json.dumps({"id": "a", "image": "im0.png", "question": "Is there a cat?", "answer": "yes"})
        + "\n"
        + json.dumps({"id": "a", "image": "im1.png", "question": "How many dogs?", "answer": "1"})
        + "\n"
        + json.dumps({"id": "b", "image": "../im1.png", "question": "How many dogs?"})
        + "\n"
    )
    assert main(_cli_args("coco", root, out, ["--questions", str(qa)])) == 1
    err = capsys.readouterr().err
    assert "qa.jsonl:2" in err and "record a" in err and "field id" in err
    assert out.read_text() == "PREVIOUS CONTENT\n"
    assert main(_cli_args("coco", root, out, ["--questions", str(qa), "--on-error", "skip"])) == 0
    records = load_records(out)
    assert [r["id"] for r in records] == ["a"] and records[0]["privileged"]["objects"][0]["label"] == "cat"
    skipped = [json.loads(line) for line in Path(out).with_suffix(".skipped.jsonl").read_text().splitlines()]
    assert [s["id"] for s in skipped] == ["a", "b"] and "escapes" in skipped[1]["reason"]


def test_unknown_privileged_format_is_a_one_line_error(mini, capsys):
    root, out = mini
    assert main(_cli_args("coco", root, out, ["--privileged-format", "nope"])) == 1
    assert "unknown privileged format 'nope'" in capsys.readouterr().err


# ------------------------------------------------- skip mode for every record-level fault (issue 13)
FILE_LEVEL = {
    "missing annotation file",
    "invalid json",
    "coco without images",
    "coco without annotations",
    "empty dataset",
}


@pytest.mark.parametrize("case", [c for c in MALFORMED if c not in FILE_LEVEL])
def test_skip_mode_skips_the_faulty_image_keeps_the_rest_and_lists_it(mini, case, capsys):
    root, out = mini
    fmt, break_it, expected = MALFORMED[case]
    break_it(root)
    extra = ["--on-error", "skip"] + (["--degenerate", "fail"] if "--degenerate fail" in case else [])
    assert main(_cli_args(fmt, root, out, extra)) == 0, capsys.readouterr().err
    skipped = [json.loads(line) for line in Path(out).with_suffix(".skipped.jsonl").read_text().splitlines()]
    # A duplicated image id also orphans the annotations of the image it hid: listed too.
    assert len(skipped) == (2 if case == "duplicate image ids" else 1) and skipped[0]["id"]
    for fragment in expected:
        assert fragment in skipped[0]["reason"] or fragment in skipped[0]["file"], (fragment, skipped[0])
    records = load_records(out)
    assert records, "the good image must still be built"
    bad = {"im0", "im1"} & set(skipped[0]["reason"].replace(".", " ").split() + [Path(skipped[0]["file"]).stem])
    for r in records:  # no record comes from the image that was skipped
        assert Path(r["prompt"][0]["content"][0]["image"]).stem not in bad or case == "unknown image id"
    assert f"{len(skipped)} skipped" in capsys.readouterr().out


def test_all_of_coco128_as_integer_voc_and_coco_builds_with_its_one_pixel_objects(tmp_path, capsys):
    # Integer corners make one real, tiny object (000000000540, 1.8 px wide) xmin == xmax in VOC:
    # VOC corners are inclusive, so it is 1 pixel wide, as in the COCO JSON of the same numbers.
    stems = sorted(p.stem for p in LABELS.glob("*.txt") if (IMAGES / f"{p.stem}.jpg").exists())
    _write_coco_and_voc(tmp_path, stems)
    voc_equal_corners = [
        b
        for x in (tmp_path / "voc").glob("*.xml")
        for b in ET.parse(x).getroot().iter("bndbox")
        if b.findtext("xmin") == b.findtext("xmax")
    ]
    assert len(voc_equal_corners) >= 1
    built = {}
    for fmt, ann in (("coco", tmp_path / "coco.json"), ("voc", tmp_path / "voc")):
        out = tmp_path / f"{fmt}.jsonl"
        assert (
            main(
                [
                    "build",
                    "grounding",
                    "--format",
                    fmt,
                    "--images",
                    str(IMAGES),
                    "--annotations",
                    str(ann),
                    "--out",
                    str(out),
                    "--objects",
                    "all",
                ]
            )
            == 0
        )
        assert "degenerate" not in capsys.readouterr().out
        built[fmt] = [{**r, "meta": {k: v for k, v in r["meta"].items() if k != "source"}} for r in load_records(out)]
    assert built["coco"] == built["voc"]
    widths = [o["bbox_px"][2] - o["bbox_px"][0] for r in built["voc"] for o in r["privileged"]["objects"]]
    assert min(widths) == 1.0


def _collapse_tiniest_box(root: Path, fmt: str) -> None:
    """Give the tiniest COCO128 object (000000000540) zero width in the given format's files."""
    if fmt == "coco":
        data = json.loads((root / "coco.json").read_text())
        tiny = min(data["annotations"], key=lambda a: a["bbox"][2])
        tiny["bbox"][2] = 0
        (root / "coco.json").write_text(json.dumps(data))
    elif fmt == "voc":
        xml = root / "voc" / "000000000540.xml"
        tree = ET.parse(xml)
        box = min(tree.getroot().iter("bndbox"), key=lambda b: int(b.findtext("xmax")) - int(b.findtext("xmin")))
        box.find("xmax").text = str(int(box.findtext("xmin")) - 1)  # inclusive corners: zero width
        tree.write(xml)
    else:
        labels = root / "labels"
        shutil.copytree(LABELS, labels)
        path = labels / "000000000540.txt"
        lines = path.read_text().splitlines()
        i = min(range(len(lines)), key=lambda k: float(lines[k].split()[3]))
        c, xc, yc, w, h = lines[i].split()
        lines[i] = f"{c} {xc} {yc} 0 {h}"
        path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("fmt", ["coco", "voc", "yolo"])
def test_zero_width_boxes_are_dropped_and_counted_kept_or_fatal_by_option(tmp_path, fmt, capsys):
    stems = sorted(p.stem for p in LABELS.glob("*.txt") if (IMAGES / f"{p.stem}.jpg").exists())[:20] + ["000000000540"]
    _write_coco_and_voc(tmp_path, stems)
    _collapse_tiniest_box(tmp_path, fmt)
    ann = {"coco": tmp_path / "coco.json", "voc": tmp_path / "voc", "yolo": tmp_path / "labels"}[fmt]
    extra = ["--classes", str(COCO128 / "coco128.yaml")] if fmt == "yolo" else []

    def build(name, *options):
        out = tmp_path / f"{name}.jsonl"
        code = main(
            [
                "build",
                "grounding",
                "--format",
                fmt,
                "--images",
                str(IMAGES),
                "--annotations",
                str(ann),
                "--out",
                str(out),
                "--objects",
                "all",
                *extra,
                *options,
            ]
        )
        return code, out, capsys.readouterr()

    code, dropped, printed = build("drop")
    assert code == 0 and "degenerate boxes dropped 1" in printed.out
    code, kept, printed = build("keep", "--degenerate", "keep")
    assert code == 0 and "degenerate boxes kept 1" in printed.out

    def count(path):  # objects per image (every question of an image carries all its objects)
        return sum(
            {
                r["prompt"][0]["content"][0]["image"]: len(r["privileged"]["objects"]) for r in load_records(path)
            }.values()
        )

    assert count(kept) == count(dropped) + 1
    zero = {
        (r["prompt"][0]["content"][0]["image"], str(o))
        for r in load_records(kept)
        for o in r["privileged"]["objects"]
        if o["bbox_px"][2] == o["bbox_px"][0]
    }
    assert len(zero) == 1 and "000000000540" in next(iter(zero))[0]
    code, failed, printed = build("fail", "--degenerate", "fail")
    assert (
        code == 1
        and "zero width or height" in printed.err
        and ("000000000540" in printed.err or "annotation id" in printed.err)
    )
    assert not failed.exists()


def test_synthesised_questions_about_every_coco_class_read_as_english():
    """Articles by the first sound's letter (an airplane, an umbrella), no article for a mass noun,
    the plurals people write (TVs, heads of broccoli, mice): for each of COCO's 80 classes."""
    from data_builders.grounding import AnnotatedImage, pluralize, synthesize_questions, with_article

    from conftest import REPO

    classes = (REPO.parent / "shared" / "data" / "coco128" / "classes.txt").read_text().split("\n")
    classes = [c.strip() for c in classes if c.strip()]
    assert len(classes) == 80
    assert [with_article(c) for c in ("airplane", "umbrella", "elephant", "car", "broccoli")] == [
        "an airplane",
        "an umbrella",
        "an elephant",
        "a car",
        "broccoli",
    ]
    assert [pluralize(c) for c in ("tv", "broccoli", "mouse", "bus", "person")] == [
        "TVs",
        "heads of broccoli",
        "mice",
        "buses",
        "people",
    ]
    for label in classes:
        image = AnnotatedImage(Path("x.png"), (100, 100), [{"label": label, "bbox_px": [1, 1, 9, 9]}], "k.json")
        for q in synthesize_questions(image, classes):
            words = q["question"].split()
            for article, noun in zip(words, words[1:]):
                if article == "a":
                    assert noun[0] not in "aeiou", q["question"]
                if article == "an":
                    assert noun[0] in "aeiou", q["question"]


def test_label_files_without_an_image_are_counted_and_the_skip_list_is_named_for_the_output(mini, capsys):
    """Every dropped input is reported: a YOLO label file whose image is missing (COCO128 has two) is
    counted in the summary, and a skipped image is listed in OUT.skipped.jsonl, named by the output."""
    root, out = mini
    (root / "labels" / "orphan.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    _set(root / "labels" / "im1.txt", "1 0.3 0.3 0.2\n")  # a broken label file: its image is skipped
    assert main(_cli_args("yolo", root, out, ["--on-error", "skip"])) == 0
    printed = capsys.readouterr().out
    skip_list = out.parent / f"{out.stem}.skipped.jsonl"
    assert "label files without an image 1" in printed and f"listed with why in {skip_list}" in printed
    assert [json.loads(line)["id"] for line in skip_list.read_text().splitlines()] == ["im1"]
