"""Property-based tests of the builders (hypothesis, bounded examples): arbitrary corruptions of
valid COCO / YOLO / VOC files end in a DatasetError or a skip, never another exception, never a
partial output; hints built from arbitrary worked solutions never contain the final answer."""

import json
import math
import shutil
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_hints import _WORD_VALUES, _numbers

from data_builders.grounding import build_grounding, load_annotations
from data_builders.hints import build_hints
from data_builders.output import BuildReport
from dopd_vl.errors import DatasetError

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
BAD_VALUES = [float("nan"), float("inf"), -float("inf"), "x", "", None, [], {}, -5, 10**9, True, 0, 1.5]


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """Two images with valid COCO, YOLO and VOC annotations (3 objects)."""
    root = tmp_path_factory.mktemp("valid")
    (root / "images").mkdir()
    for i, (w, h) in enumerate([(64, 48), (80, 60)]):
        Image.fromarray(np.full((h, w, 3), 50 * (i + 1), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
    coco = {
        "images": [
            {"id": 1, "file_name": "im0.png", "width": 64, "height": 48},
            {"id": 2, "file_name": "im1.png", "width": 80, "height": 60},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [2, 3, 20, 10]},
            {"id": 11, "image_id": 1, "category_id": 2, "bbox": [30, 5, 10, 10]},
            {"id": 12, "image_id": 2, "category_id": 2, "bbox": [5, 5, 30, 30]},
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    (root / "coco.json").write_text(json.dumps(coco))
    (root / "labels").mkdir()
    (root / "labels" / "im0.txt").write_text("0 0.5 0.5 0.25 0.25\n1 0.2 0.3 0.1 0.1\n")
    (root / "labels" / "im1.txt").write_text("1 0.3 0.3 0.2 0.2\n")
    (root / "classes.txt").write_text("cat\ndog\n")
    (root / "voc").mkdir()
    for i, (w, h, name) in enumerate([(64, 48, "cat"), (80, 60, "dog")]):
        (root / "voc" / f"im{i}.xml").write_text(
            f"<annotation><filename>im{i}.png</filename><size><width>{w}</width><height>{h}</height><depth>3</depth></size>"
            f"<object><name>{name}</name><bndbox><xmin>3</xmin><ymin>4</ymin><xmax>20</xmax><ymax>15</ymax></bndbox></object></annotation>"
        )
    return root


def _leaves(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, (*path, i))
    yield path


def _build_both_modes(fmt, root, annotations):
    """Load and build in fail and skip modes: a DatasetError or a complete output, nothing else."""
    for on_error in ("fail", "skip"):
        out = root / "out" / f"{on_error}.jsonl"
        out.parent.mkdir(exist_ok=True)
        try:
            report = BuildReport()
            images = load_annotations(
                fmt,
                root / "images",
                annotations,
                root / "classes.txt" if fmt == "yolo" else None,
                on_error=on_error,
                report=report,
            )
            build_grounding(images, out, on_error=on_error, report=report)
        except DatasetError:
            assert not out.exists()
        else:
            assert out.exists() and all(json.loads(line)["id"] for line in out.read_text().splitlines())
        assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "temporary files left behind"


@SETTINGS
@given(data=st.data())
def test_corrupted_coco_files_fail_cleanly_or_skip(valid, data):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copytree(valid / "images", root / "images")
        doc = json.loads((valid / "coco.json").read_text())
        kind = data.draw(st.sampled_from(["replace", "delete", "truncate", "unknown id"]))
        if kind == "truncate":
            text = json.dumps(doc)
            text = text[: data.draw(st.integers(0, len(text) - 1))]
        else:
            paths = [p for p in _leaves(doc) if p]
            path = data.draw(st.sampled_from(paths))
            parent = doc
            for key in path[:-1]:
                parent = parent[key]
            if kind == "replace":
                parent[path[-1]] = data.draw(st.sampled_from(BAD_VALUES))
            elif kind == "delete":
                del parent[path[-1]]
            else:
                ann = doc["annotations"][data.draw(st.integers(0, 2))]
                ann[data.draw(st.sampled_from(["image_id", "category_id"]))] = 999
            text = json.dumps(doc)
        (root / "coco.json").write_text(text)
        _build_both_modes("coco", root, root / "coco.json")


@SETTINGS
@given(data=st.data())
def test_corrupted_yolo_labels_fail_cleanly_or_skip(valid, data):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copytree(valid / "images", root / "images")
        shutil.copytree(valid / "labels", root / "labels")
        shutil.copy(valid / "classes.txt", root / "classes.txt")
        label = root / "labels" / data.draw(st.sampled_from(["im0.txt", "im1.txt"]))
        lines = [line.split() for line in label.read_text().splitlines()]
        kind = data.draw(st.sampled_from(["replace", "delete", "extra", "truncate", "binary"]))
        row = data.draw(st.integers(0, len(lines) - 1))
        if kind == "replace":
            lines[row][data.draw(st.integers(0, 4))] = data.draw(
                st.sampled_from(["nan", "inf", "-inf", "x", "-0.5", "1e9", "7", "0", "0x1"])
            )
        elif kind == "delete":
            del lines[row][data.draw(st.integers(0, 4))]
        elif kind == "extra":
            lines[row].append("0.1")
        text = "\n".join(" ".join(fields) for fields in lines) + "\n"
        if kind == "truncate":
            text = text[: data.draw(st.integers(0, len(text) - 1))]
        label.write_bytes(b"\xff\xfe\x00bad" if kind == "binary" else text.encode())
        _build_both_modes("yolo", root, root / "labels")


@SETTINGS
@given(data=st.data())
def test_corrupted_voc_files_fail_cleanly_or_skip(valid, data):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copytree(valid / "images", root / "images")
        shutil.copytree(valid / "voc", root / "voc")
        xml = root / "voc" / data.draw(st.sampled_from(["im0.xml", "im1.xml"]))
        kind = data.draw(st.sampled_from(["replace", "delete", "truncate"]))
        if kind == "truncate":
            text = xml.read_text()
            xml.write_text(text[: data.draw(st.integers(0, len(text) - 1))])
        else:
            tree = ET.parse(xml)
            elements = [e for e in tree.getroot().iter() if e is not tree.getroot()]
            element = data.draw(st.sampled_from(elements))
            if kind == "replace":
                element.text = data.draw(
                    st.sampled_from(["nan", "inf", "-3", "abc", "", "99999", "../x.png", "/etc/passwd"])
                )
            else:
                parent = next(p for p in tree.getroot().iter() if element in list(p))
                parent.remove(element)
            tree.write(xml)
        _build_both_modes("voc", root, root / "voc")


# ------------------------------------------------------------------------------------- hints
def _words(n: int) -> str:
    """The test's own English for 0..99."""
    units = {v: w for w, v in _WORD_VALUES.items() if v < 20}
    tens = {v: w for w, v in _WORD_VALUES.items() if v >= 20}
    return units[n] if n < 20 else tens[n - n % 10] + ("" if n % 10 == 0 else "-" + units[n % 10])


NOTATIONS = [
    lambda n: str(n),
    lambda n: f"{n:,}",
    lambda n: f"${n}",
    lambda n: f"{n}%",
    lambda n: f"{n}.0",
    lambda n: f"{n}kg",
    lambda n: f"{n}Mb",
    lambda n: f"{n:,}.00 dollars",
    lambda n: _words(n) if n < 100 else str(n),
]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    answer=st.integers(1, 20000),
    other=st.lists(st.integers(1, 99), min_size=1, max_size=3),
    notations=st.lists(st.integers(0, len(NOTATIONS) - 1), min_size=1, max_size=4),
    annotate=st.booleans(),
)
def test_step_hints_never_contain_the_final_answer_in_any_notation(answer, other, notations, annotate):
    steps = []
    for k, notation in enumerate(notations):
        shown = NOTATIONS[notation](answer)
        a = other[k % len(other)]
        if annotate:  # GSM8K calculator annotation: the result is a computed one
            steps.append(f"Step {k}: {a}+{answer - a}=<<{a}+{answer - a}={answer}>>{shown} in total")
        else:
            steps.append(f"Then we get {shown} after adding {a}")
    row = {"id": "p", "question": "How much is it in the end?", "solution": steps + [f"#### {answer}"]}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "in.jsonl"
        data.write_text(json.dumps(row) + "\n")
        report = build_hints(data, Path(tmp) / "out.jsonl")
    (record,) = report.records
    for hint in record["privileged"]["hints"]:
        assert float(answer) not in _numbers(hint), (hint, answer)
    assert report.leaks == []
    assert not math.isnan(float(record["answer"]))
