"""The data preflight (`dopd check-data`, `data.preflight` / `data.on_error` in training;
docs/design.md §3.1) on a corpus of real faulty files, and files that vanish mid-run."""

import json
import shutil
import struct
import zlib
from pathlib import Path

import pytest

from dopd_vl.cli import main
from dopd_vl.data.preflight import check_data, check_image
from dopd_vl.data.sources import load_records
from dopd_vl.errors import DatasetError
from dopd_vl.modality.adapters import make_adapter
from dopd_vl.models.tiny import build_char_tokenizer
from dopd_vl.training.config import load_config
from dopd_vl.training.step import sample_step

from conftest import REPO

SHAPES = REPO / "configs" / "data" / "shapes"
RECIPE = REPO / "configs" / "tiny_vlm.yaml"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (valid CRCs) with one empty IDAT: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


@pytest.fixture()
def corpus(tmp_path) -> Path:
    """The shapes data plus one record per fault kind; returns the JSONL path."""
    root = tmp_path / "corpus"
    shutil.copytree(SHAPES / "images", root / "images")
    good = [json.loads(line) for line in (SHAPES / "data.jsonl").read_text().splitlines()[:4]]
    png = (root / "images" / "scene_000.png").read_bytes()
    (root / "images" / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "images" / "empty.png").write_bytes(b"")
    (root / "images" / "bomb.png").write_bytes(png_header_only(20000, 20000))
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.png").write_bytes(png)  # a sound image, but not the dataset's
    (root / "images" / "link.png").symlink_to(tmp_path / "outside" / "secret.png")

    def variant(rid: str, image: str | None = None, **changes) -> dict:
        record = json.loads(json.dumps(good[0]))
        record["id"] = rid
        if image is not None:
            record["prompt"][0]["content"][0]["image"] = image
        record.update(changes)
        return record

    long_question = "How many blue circles are in the image? " * 40
    faulty = [
        variant("missing", "images/nowhere.png"),
        variant("truncated", "images/truncated.png"),
        variant("empty", "images/empty.png"),
        variant("bomb", "images/bomb.png"),
        variant(
            "overlong",
            prompt=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": "images/scene_000.png"},
                        {"type": "text", "text": long_question},
                    ],
                }
            ],
        ),
        variant(
            "box_out",
            privileged={
                **good[0]["privileged"],
                "objects": [{"label": "blue circle", "bbox_px": [150.0, 100.0, 400.0, 300.0]}],
            },
        ),
        variant("no_context", privileged_context="   "),
        variant("escape_dots", "images/../../outside/secret.png"),
        variant("escape_link", "images/link.png"),
    ]
    lines = (
        [json.dumps(r) for r in good[:2]]
        + [json.dumps(r) for r in faulty]
        + ['{"id": "broken json", ']
        + [json.dumps({"id": "no_prompt"})]
        + [json.dumps(r) for r in good[2:]]
    )
    path = root / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


EXPECTED = {
    "missing": ("image_missing", "prompt.image[0]"),
    "truncated": ("image_truncated", "prompt.image[0]"),
    "empty": ("image_unreadable", "prompt.image[0]"),
    "bomb": ("image_too_large", "prompt.image[0]"),
    "overlong": ("prompt_too_long", "prompt"),
    "box_out": ("box_outside_image", "privileged.objects[0].bbox_px"),
    "no_context": ("context_unrenderable", "privileged_context"),
    "escape_dots": ("image_outside_roots", "prompt.image[0]"),
    "escape_link": ("image_outside_roots", "prompt.image[0]"),
    "line 12": ("invalid_json", ""),
    "no_prompt": ("schema", "prompt"),
}


@pytest.mark.parametrize("mode", ["full", "quick"])
def test_check_data_reports_every_fault_with_its_line_record_and_field(corpus, tmp_path, mode, capsys):
    out = tmp_path / f"report-{mode}.json"
    code = main(
        [
            "check-data",
            str(RECIPE),
            f"data.train={corpus}",
            "rollout.max_prompt_length=300",
            f"output_dir={tmp_path / 'run'}",
            "--mode",
            mode,
            "--out",
            str(out),
        ]
    )
    assert code == 1
    (report,) = json.loads(out.read_text())["reports"]
    found = {f["record"]: (f["kind"], f["field"]) for f in report["faults"]}
    assert found == EXPECTED
    lines = {f["record"]: f["where"] for f in report["faults"]}
    assert (
        lines["missing"] == f"{corpus}:3"
        and lines["no_prompt"] == f"{corpus}:13"
        and lines["line 12"] == f"{corpus}:12"
    )
    assert report["records"] == 15 and report["faulty_records"] == 11 and report["counts"]["image_outside_roots"] == 2
    printed = capsys.readouterr().out
    assert (
        "11 of 15 records have faults" in printed
        and f"{corpus}:3: record missing, field prompt.image[0]: image_missing" in printed
    )


@pytest.mark.integration
def test_training_stops_before_the_first_step_under_fail_and_trains_on_the_rest_under_skip(corpus, tmp_path, capsys):
    common = [f"data.train={corpus}", "rollout.max_prompt_length=300", "max_steps=1", "save_steps=1"]
    assert main(["train", str(RECIPE), *common, f"output_dir={tmp_path / 'fail'}"]) == 1
    err = capsys.readouterr().err
    assert (
        "the data preflight found faults" in err and "record truncated, field prompt.image[0]: image_truncated" in err
    )
    assert not (tmp_path / "fail" / "metrics.jsonl").exists()  # stopped before any step

    run = tmp_path / "skip"
    assert main(["train", str(RECIPE), *common, "data.on_error=skip", f"output_dir={run}"]) == 0
    skipped = [json.loads(line) for line in (run / "skipped.jsonl").read_text().splitlines()]
    assert {s["id"] for s in skipped} == set(EXPECTED) and all(
        s["step"] == 0 and s["where"].startswith(str(corpus)) for s in skipped
    )
    (metrics,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert (
        metrics["data/skipped_records"] == 11
        and json.loads((run / "run.json").read_text())["data"]["train_records"] == 4
    )


def test_a_line_that_is_not_json_keeps_pythons_whole_message(tmp_path):
    """The position is the file's line and column, and no column poses as a field (README item: the
    JSON error keeps Python's message whole)."""
    bad = tmp_path / "bad_line.jsonl"
    broken = '{"id": "b", "prompt": [{"role": "user", "content": "2+2=}]}'
    good = json.dumps({"id": "a", "prompt": [{"role": "user", "content": "1+1="}]})
    bad.write_text(f"{good}\n{broken}\n", encoding="utf-8")
    try:
        json.loads(broken)
    except json.JSONDecodeError as python:
        told = f"invalid JSON: {python.msg}: line 2 column {python.colno} (char {python.pos})"
    with pytest.raises(DatasetError) as err:
        load_records(bad)
    assert str(err.value) == f"file {bad}:2, record line 2: {told}" and "column 52" in told
    _, report, _ = check_data(bad, make_adapter(build_char_tokenizer()), privileged=False, progress=False)
    (fault,) = report.faults
    assert fault.field == "" and report.summary().splitlines()[1] == f"  {bad}:2: record line 2: invalid_json: {told}"


def test_check_data_writes_under_a_folder_named_for_the_data_and_names_a_report_it_replaces(corpus, tmp_path, capsys):
    """Without --out the report goes beside the run folder, named for the data read (never into the
    run's folder); a second check names the report it replaces."""
    run = tmp_path / "runs" / "tiny"
    args = ["check-data", str(RECIPE), f"data.train={corpus}", f"output_dir={run}", "--mode", "quick"]
    main(args)
    report = tmp_path / "runs" / "check-data" / f"{corpus.stem}.json"
    assert json.loads(report.read_text())["reports"][0]["records"] == 15 and not run.exists()
    assert "replacing" not in capsys.readouterr().out
    main(args)
    assert f"report in {report} (replacing the earlier {report})" in capsys.readouterr().out


def test_data_image_roots_admits_a_folder_the_user_names(corpus, tmp_path):
    out = tmp_path / "report.json"
    main(
        [
            "check-data",
            str(RECIPE),
            f"data.train={corpus}",
            f"data.image_roots=[{tmp_path / 'outside'}]",
            "rollout.max_prompt_length=300",
            f"output_dir={tmp_path / 'run'}",
            "--mode",
            "quick",
            "--out",
            str(out),
        ]
    )
    found = {f["record"]: f["kind"] for f in json.loads(out.read_text())["reports"][0]["faults"]}
    assert "escape_dots" not in found and "escape_link" not in found and found["missing"] == "image_missing"


def test_the_routing_page_never_inlines_an_image_outside_the_roots(corpus, tmp_path):
    from dopd_vl.apps.routing_page import RoutedResponse, write_routing_html
    from dopd_vl.data.images import load_image
    from dopd_vl.errors import ImageOutsideRoots

    records = {r["id"]: r for r in (json.loads(line) for line in corpus.read_text().splitlines() if line.endswith("}"))}

    def routed(record):
        return RoutedResponse(
            record, tokens=["2"], regimes=["LL"], advantage_gap=[0.1], q_student=[0.5], q_teacher=[0.6]
        )

    inside = records["scene_000-count"]
    page = write_routing_html(tmp_path / "ok.html", [routed(inside)], {"A": 0.1}, image_root=corpus.parent).read_text()
    assert page.count("data:image/png;base64,") == 1
    for rid in ("escape_dots", "escape_link"):
        with pytest.raises(
            ImageOutsideRoots,
            match=rf"record {rid}, field prompt.image: .*outside/secret.png, outside the allowed image roots",
        ):
            write_routing_html(tmp_path / f"{rid}.html", [routed(records[rid])], {"A": 0.1}, image_root=corpus.parent)
        assert not (tmp_path / f"{rid}.html").exists()
        with pytest.raises(ImageOutsideRoots):  # nor does any model input read it
            load_image(records[rid]["prompt"][0]["content"][0]["image"], corpus.parent, rid)


@pytest.mark.integration
@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_an_image_that_vanishes_mid_run(tmp_path, on_error):
    from dopd_vl.training.trainer import Trainer

    shutil.copytree(SHAPES, tmp_path / "shapes")
    data = tmp_path / "shapes" / "data.jsonl"
    config = load_config(
        RECIPE,
        [
            f"data.train={data}",
            f"output_dir={tmp_path / 'run'}",
            "max_steps=2",
            "save_steps=2",
            f"data.on_error={on_error}",
        ],
    )
    trainer = Trainer(config)  # the preflight passes: every image is there
    for image in (tmp_path / "shapes" / "images").glob("*.png"):
        if image.name != "scene_001.png":
            image.unlink()
    if on_error == "fail":
        with pytest.raises(
            DatasetError, match=r"image not found: .*scene_\d+\.png \(it was there when the run started\)"
        ) as caught:
            trainer.train()
        assert caught.value.field == "prompt.image" and caught.value.record.startswith("scene_")
        return
    trainer.train()
    skipped = [json.loads(line) for line in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert skipped and all(
        s["kind"] == "image_missing" and s["step"] >= 1 and "vanished mid-run" in s["message"] for s in skipped
    )
    assert all(
        r["id"].startswith("scene_001") for mb in sample_step(trainer.run, trainer.step) for r in mb.records
    )  # only the survivor's records are used


def test_check_image_quick_and_full_on_real_files(tmp_path):
    png = (SHAPES / "images" / "scene_000.png").read_bytes()
    (tmp_path / "ok.png").write_bytes(png)
    (tmp_path / "cut.png").write_bytes(png[:-20])  # decodes in part; the end marker is gone
    assert check_image("ok.png", tmp_path, "quick") == (None, (160, 120)) == check_image("ok.png", tmp_path, "full")
    assert check_image("cut.png", tmp_path, "quick")[0] == "image_truncated"
    assert check_image({"bytes": png, "path": None}, None, "full") == (None, (160, 120))


def test_quick_counts_vision_prompt_tokens_from_image_sizes_as_the_processor_does(tmp_path):
    from PIL import Image

    from dopd_vl.data.image_roots import image_roots
    from dopd_vl.data.images import image_parts
    from dopd_vl.data.sources import load_records
    from dopd_vl.modality.adapters import make_adapter
    from dopd_vl.models.loading import load_processing

    adapter = make_adapter(
        load_processing("tiny:qwen3-vl"), image_root=image_roots(SHAPES, [tmp_path])
    )  # the enlarged copies live in tmp_path
    for n, record in enumerate(load_records(SHAPES / "data.jsonl")[:12]):
        (ref,) = image_parts(record)
        size = Image.open(SHAPES / ref).size
        for view in ("student", "student_priv"):
            assert adapter.prompt_length(record, view, [size]) == adapter.prompt(record, view).input_ids.numel()
        big = (size[0] * (n + 2), size[1] * (n % 3 + 2))  # other sizes: the count follows the processor's resize
        Image.open(SHAPES / ref).resize(big).save(tmp_path / f"big{n}.png")
        enlarged = json.loads(json.dumps(record))
        enlarged["prompt"][0]["content"][0]["image"] = str(tmp_path / f"big{n}.png")
        assert (
            adapter.prompt_length(enlarged, "student", [big]) == adapter.prompt(enlarged, "student").input_ids.numel()
        )
    cropped = {**record, "privileged_context": [{"type": "image", "crop": [0, 0, 40, 40]}]}
    assert (
        adapter.prompt_length(cropped, "student_priv", [size]) is None
    )  # a crop's size depends on its geometry: rendered instead


def test_the_printed_summary_lists_every_fault_unless_the_list_is_long(tmp_path):
    from dopd_vl.data.preflight import DataReport, Fault

    def report(n: int) -> DataReport:
        faults = [
            Fault("image_missing", f"data.jsonl:{i + 1}", f"r{i}", "prompt.image[0]", "image not found", i)
            for i in range(n)
        ]
        return DataReport("data.jsonl", "quick", records=n, faults=faults)

    six = report(6).summary().splitlines()  # the old summary printed five and "... and 1 more"
    assert len(six) == 7 and six[-1].startswith("  data.jsonl:6: record r5") and "more" not in "\n".join(six)
    ten = report(10).summary()
    assert "record r9," in ten and "more" not in ten
    long = report(20).summary(report=tmp_path / "data_check.json").splitlines()
    assert [line.split(":")[1] for line in long[1:6]] == ["1", "2", "3", "4", "5"]
    assert long[-1] == f"  ... and 15 more: every fault is listed in {tmp_path / 'data_check.json'}"
