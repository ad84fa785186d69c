"""The main job at its smallest size (seconds): `dopd demo`'s pipeline, and on its outputs
`dopd eval`, `dopd plot` and `dopd inspect --routing`."""

import html
import json
import re

import pytest
from PIL import Image

from dopd_vl.cli import main
from dopd_vl.errors import DopdError
from dopd_vl.method.routing import REGIME_NAMES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SPAN = re.compile(
    r'<span class="tok" data-regime="(\w+)" data-a="([-\d.e]+)" data-q-student="([-\d.e]+)" data-q-teacher="([-\d.e]+)"'
)


pytestmark = [pytest.mark.xdist_group("demo"), pytest.mark.integration]  # loadgroup: one worker builds the fixture


@pytest.fixture(scope="session")  # once per worker: xdist may interleave other modules between its tests
def demo_run(tmp_path_factory):
    """`dopd demo` at its smallest size through the CLI, as a fresh process runs it (transformers'
    progress bars enabled), with what it printed."""
    import contextlib
    import functools
    import io

    from transformers.utils import logging as transformers_logging

    import dopd_vl.apps.demo as demo_module

    out = tmp_path_factory.mktemp("demo") / "demo_out"
    small = functools.partial(
        demo_module.DemoConfig, eval_images=3, teacher_sft_steps=4, student_sft_steps=2, batch_size=2, routing_records=3
    )
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        mp.setattr(demo_module, "DemoConfig", small)
        mp.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
        transformers_logging.enable_progress_bar()  # as a fresh process starts
        assert main(["demo", "--out", str(out), "--images", "8", "--steps", "2"]) == 0
    assert json.loads((out / "summary.json").read_text())["config"]["steps"] == 2
    return out, printed.getvalue()


@pytest.fixture
def demo_dir(demo_run):
    return demo_run[0]


def test_demo_writes_every_artifact(demo_dir, capsys):
    from transformers import AutoModelForImageTextToText

    for name in (
        "data/data.jsonl",
        "data/train.jsonl",
        "data/eval.jsonl",
        "data/annotations.json",
        "run/metrics.jsonl",
        "summary.md",
        "summary.json",
        "routing.html",
    ):
        assert (demo_dir / name).is_file(), name
    summary = json.loads((demo_dir / "summary.json").read_text())
    for key in ("accuracy_before", "accuracy_after", "regime_fractions_mean"):
        assert key in summary
    assert sum(summary["regime_fractions_mean"].values()) == pytest.approx(1.0)
    assert 0.0 <= summary["accuracy_after"]["student"]["accuracy"] <= 1.0
    text = (demo_dir / "summary.md").read_text()
    assert "student before" in text and "student after DOPD" in text and "| HT |" in text
    from test_docs import missing_citations  # the generated summary's design citations exist

    from conftest import REPO

    assert "docs/design.md §4.5" in text
    assert missing_citations(REPO / "docs" / "design.md", [demo_dir / "summary.md"]) == []
    metrics = [json.loads(line) for line in (demo_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    pngs = sorted((demo_dir / "plots").glob("*.png"))
    assert {p.stem for p in pngs} >= {"regimes", "thresholds", "entropy", "loss"}
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_MAGIC
        with Image.open(png) as image:
            image.verify()
    model = AutoModelForImageTextToText.from_pretrained(demo_dir / "student")
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"


def test_routing_view_has_one_element_per_response_token(demo_dir):
    from dopd_vl.apps.routing_page import route_records, write_routing_html
    from dopd_vl.data.sources import load_records
    from dopd_vl.modality.adapters import make_adapter
    from dopd_vl.models.loading import load_model, load_processing

    student_dir = demo_dir / "student"
    model, processing = load_model(student_dir).eval(), load_processing(student_dir)
    data = demo_dir / "data" / "eval.jsonl"
    records = load_records(data)[:2]
    adapter = make_adapter(processing, image_root=data.parent)
    responses = [
        adapter.tokenizer("yes it is", return_tensors="pt").input_ids[0],
        adapter.tokenizer("3", return_tensors="pt").input_ids[0],
    ]
    routed, thresholds = route_records(
        model, model, {"student": adapter, "teacher": adapter}, records, responses, len(adapter.tokenizer)
    )
    page = write_routing_html(demo_dir / "view_test.html", routed, thresholds, image_root=data.parent).read_text()
    spans = SPAN.findall(page)
    assert len(spans) == sum(r.numel() for r in responses)
    assert [s[0] for s in spans] == [reg for r in routed for reg in r.regimes]
    assert all(s[0] in REGIME_NAMES for s in spans)
    distinct = {r["prompt"][0]["content"][0]["image"] for r in records}  # each image embedded once
    assert page.count("data:image/png;base64,") == len(distinct)
    assert html.escape(records[0]["privileged_context"]) in page


def test_demo_artifact_routing_html_and_cli_inspect_routing(demo_dir, capsys):
    page = (demo_dir / "routing.html").read_text()
    assert len(SPAN.findall(page)) > 0 and page.count("<section") == 3
    out = demo_dir / "cli_routing.html"
    args = [
        "inspect",
        "--student",
        str(demo_dir / "student"),
        "--teacher",
        str(demo_dir / "models" / "teacher"),
        "--data",
        str(demo_dir / "data" / "eval.jsonl"),
        "--routing",
        str(out),
        "--count",
        "2",
        "--max-new-tokens",
        "4",
    ]
    assert main(args) == 0
    assert "wrote the routing view of 2 records" in capsys.readouterr().out
    spans = SPAN.findall(out.read_text())
    assert 2 <= len(spans) <= 8 and all(s[0] in REGIME_NAMES for s in spans)


def test_routing_page_draws_the_privileged_boxes_and_their_labels(demo_dir):
    """Every privileged box is drawn by the browser (an SVG rectangle over the image, at the box's
    place scaled to the drawn width) in its label's one colour, and the caption names every label."""
    from dopd_vl.apps.routing_page import DISPLAY_WIDTH
    from dopd_vl.data.sources import load_records

    page = (demo_dir / "routing.html").read_text()
    records = {r["id"]: r for r in load_records(demo_dir / "data" / "eval.jsonl")}
    sections = re.findall(r'<section class="record" data-id="([^"]+)">(.*?)</section>', page, re.S)
    assert sections
    colour_of: dict[str, str] = {}
    for record_id, body in sections:
        record = records[html.unescape(record_id)]
        width = Image.open(demo_dir / "data" / record["prompt"][0]["content"][0]["image"]).width
        scale = DISPLAY_WIDTH / width
        rects = re.findall(
            r'<rect x="([\d.]+)" y="([\d.]+)" width="([\d.]+)" height="([\d.]+)" fill="none" stroke="(#\w+)"', body
        )
        texts = [html.unescape(t) for t in re.findall(r"<text[^>]*>([^<]*)</text>", body)]
        objects = record["privileged"]["objects"]
        assert len(rects) == len(objects) == len(texts)
        for obj, (x, y, w, h, colour), label in zip(objects, rects, texts):
            x1, y1, x2, y2 = obj["bbox_px"]
            assert label == obj["label"] and colour_of.setdefault(label, colour) == colour  # one colour a label
            drawn, box = (
                [float(v) for v in (x, y, w, h)],
                [x1 * scale, y1 * scale, (x2 - x1) * scale, (y2 - y1) * scale],
            )
            assert all(abs(a - b) < 0.1 for a, b in zip(drawn, box))
            assert f">{html.escape(obj['label'])}</span>" in body  # the caption names every label


def test_every_file_the_demo_writes_has_the_mode_a_created_file_gets(demo_dir):
    from data_builders.output import created_mode

    wrong = {
        str(p.relative_to(demo_dir)): oct(p.stat().st_mode & 0o777)
        for p in demo_dir.rglob("*")
        if p.is_file() and p.stat().st_mode & 0o777 != created_mode()
    }
    assert wrong == {}


def test_dopd_eval_reports_accuracy_per_question_type(demo_dir, capsys):
    data = demo_dir / "data" / "eval.jsonl"
    assert (
        main(
            [
                "eval",
                "--model",
                str(demo_dir / "models" / "teacher"),
                "--data",
                str(data),
                "--privileged",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    said = capsys.readouterr().out.strip()
    written = demo_dir / "models" / "eval" / "teacher-eval-privileged.json"  # the default: beside the model
    assert said.startswith("accuracy ") and said.endswith(f"report in {written}") and "count " in said
    report = json.loads(written.read_text())
    types = {json.loads(line)["meta"]["question_type"] for line in data.read_text().splitlines()}
    assert set(report["per_type"]) == types and report["privileged"] is True
    assert report["count"] == len(data.read_text().splitlines())
    assert report["accuracy"] == pytest.approx(sum(r["correct"] for r in report["responses"]) / report["count"])
    out = demo_dir / "eval.json"
    assert (
        main(["eval", "--model", str(demo_dir / "student"), "--data", str(data), "--out", str(out), "--limit", "2"])
        == 0
    )
    assert json.loads(out.read_text())["count"] == 2


def test_dopd_plot_cli(demo_dir, capsys, tmp_path):
    assert main(["plot", str(demo_dir / "run"), "--out", str(tmp_path / "plots")]) == 0
    written = capsys.readouterr().out.split()
    assert len(written) >= 4 and all(open(p, "rb").read(8) == PNG_MAGIC for p in written)
    assert main(["plot", str(tmp_path)]) == 1  # not a run folder: one clear line
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_demo_refuses_to_replace_a_folder_it_did_not_write(tmp_path):
    from dopd_vl.apps.demo import run_demo

    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(DopdError, match="not a demo folder"):
        run_demo(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_dopd_demo_shows_our_progress_bars_and_none_of_transformers(demo_run, tmp_path):
    """transformers draws "Loading weights" / "Writing model shards" bars for every model load and
    save (checked below: it does, outside `dopd`); `dopd demo` keeps only its own bars."""
    import os
    import subprocess
    import sys

    demo, shown = demo_run
    assert "Loading weights" not in shown and "Writing model shards" not in shown
    assert "sft (teacher_priv)" in shown and "dopd: 100%" in shown  # our own bars stay
    control = subprocess.run(  # the same load and save outside `dopd`: transformers' bars are there
        [
            sys.executable,
            "-c",
            "import sys; from transformers import AutoModelForImageTextToText as M; "
            "M.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])",
            str(demo / "student"),
            str(tmp_path / "copy"),
        ],
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"},  # `dopd` set it here
    )
    assert "Loading weights" in control.stderr and "Writing model shards" in control.stderr
