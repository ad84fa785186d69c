"""What builders, the trainer and the demo write (data_builders/output.py): images of a datasets
source that has them only as bytes land beside a JSONL output (with it, or not at all), files get
the mode the user's umask gives, and no built record carries a path of the builder's machine."""

import json
import os
from pathlib import Path

import pytest
from test_grounding import _cli_args, mini  # noqa: F401  (the fixture)

from dopd_vl.cli import main
from dopd_vl.data.sources import load_records

from conftest import REPO

SHAPES = REPO / "configs" / "data" / "shapes"


@pytest.fixture
def umask():
    """Set the process's umask for a test, restored after."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda value: os.umask(value)
    os.umask(old)


def _embedded_detection_dataset(path: Path, rows: int = 4) -> Path:
    """A save_to_disk detection dataset whose images are bytes only (no path), from the shapes scenes."""
    import datasets

    coco = json.loads((SHAPES / "annotations.json").read_text())
    names = [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
    cat_index = {c["id"]: names.index(c["name"]) for c in coco["categories"]}
    data = []
    for entry in coco["images"][:rows]:
        anns = [a for a in coco["annotations"] if a["image_id"] == entry["id"]]
        data.append(
            {
                "image": {"bytes": (SHAPES / "images" / entry["file_name"]).read_bytes(), "path": None},
                "objects": {"bbox": [a["bbox"] for a in anns], "category": [cat_index[a["category_id"]] for a in anns]},
            }
        )
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "objects": {
                "bbox": datasets.List(datasets.List(datasets.Value("float64"))),
                "category": datasets.List(datasets.ClassLabel(names=names)),
            },
        }
    )
    datasets.Dataset.from_list(data, features=features).save_to_disk(str(path))
    return path


@pytest.mark.integration
def test_embedded_images_are_written_beside_a_jsonl_output_and_train_from_elsewhere(tmp_path, monkeypatch):
    dataset = _embedded_detection_dataset(tmp_path / "det")
    out = tmp_path / "built" / "train.jsonl"
    assert main(["build", "grounding", "--format", "hf", "--dataset", str(dataset), "--out", str(out)]) == 0
    records = load_records(out)
    folder = out.parent / "train_images"
    files = sorted(p.name for p in folder.iterdir())
    assert len(files) == 4 and all(name.endswith(".png") for name in files)
    used = {
        part["image"]
        for r in records
        for m in r["prompt"]
        for part in m["content"]
        if isinstance(part, dict) and part.get("type") == "image"
    }
    assert used == {f"train_images/{name}" for name in files}
    scene = (SHAPES / "images" / "scene_000.png").read_bytes()
    assert any((folder / name).read_bytes() == scene for name in files)  # the bytes themselves, not a re-encoding
    # Training reads them from another working directory: paths resolve against the dataset's folder.
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                str(REPO / "configs" / "tiny_vlm.yaml"),
                f"data.train={out}",
                f"output_dir={run}",
                "max_steps=1",
                "save_steps=10",
            ]
        )
        == 0
    )
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    # --images-dir names the folder; it must stay beside the output.
    assert (
        main(
            [
                "build",
                "grounding",
                "--format",
                "hf",
                "--dataset",
                str(dataset),
                "--out",
                str(out),
                "--images-dir",
                "pictures/scenes",
            ]
        )
        == 0
    )
    assert len(list((out.parent / "pictures" / "scenes").iterdir())) == 4
    assert (
        main(
            [
                "build",
                "grounding",
                "--format",
                "hf",
                "--dataset",
                str(dataset),
                "--out",
                str(tmp_path / "x.jsonl"),
                "--images-dir",
                "../up",
            ]
        )
        == 1
    )


def test_a_failed_build_leaves_neither_the_jsonl_nor_the_image_folder(tmp_path, monkeypatch):
    import data_builders.output as output

    dataset = _embedded_detection_dataset(tmp_path / "det", rows=2)
    out = tmp_path / "built" / "train.jsonl"
    real_replace = os.replace

    def failing_replace(src, dst):  # the image folder goes in, then the JSONL's rename fails
        if Path(dst) == out:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(output.os, "replace", failing_replace)
    with pytest.raises(OSError):
        from data_builders.grounding import build_grounding, load_hf_detections

        build_grounding(load_hf_detections(dataset), out)
    assert sorted(p.name for p in (tmp_path / "built").iterdir()) == []


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_builder_outputs_get_the_mode_the_umask_gives(mini, tmp_path, umask, mask):  # noqa: F811
    from data_builders.output import created_mode

    root, out = mini
    umask(mask)
    assert created_mode() == 0o666 & ~mask and (mask != 0o022 or created_mode() == 0o644)
    (root / "labels" / "im1.txt").write_text("1 0.3 abc 0.2 0.2\n")  # one bad image: skip mode writes a listing too
    assert main(_cli_args("yolo", root, out, ["--classes", str(root / "classes.txt"), "--on-error", "skip"])) == 0
    parquet, folder = out.parent / "d.parquet", out.parent / "d_folder"
    assert main(_cli_args("coco", root, parquet)) == 0
    assert main(_cli_args("voc", root, folder)) == 0
    dataset = _embedded_detection_dataset(tmp_path / "det", rows=2)
    embedded = out.parent / "e.jsonl"
    assert main(["build", "grounding", "--format", "hf", "--dataset", str(dataset), "--out", str(embedded)]) == 0
    written = [
        out,
        Path(out).with_suffix(".skipped.jsonl"),
        parquet,
        embedded,
        *(out.parent / "e_images").iterdir(),
        *[p for p in folder.rglob("*") if p.is_file()],
    ]
    assert {str(p.relative_to(out.parent)): oct(p.stat().st_mode & 0o777) for p in written} == {
        str(p.relative_to(out.parent)): oct(0o666 & ~mask) for p in written
    }
    assert oct((out.parent / "e_images").stat().st_mode & 0o777) == oct(0o777 & ~mask)


@pytest.mark.integration
def test_trainer_outputs_follow_the_umask(tmp_path, umask):
    from dopd_vl.training.config import load_config
    from dopd_vl.training.trainer import Trainer

    umask(0o027)
    run = tmp_path / "run"
    Trainer(
        load_config(REPO / "configs" / "tiny_text.yaml", [f"output_dir={run}", "max_steps=1", "save_steps=1"])
    ).train()
    files = [p for p in run.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"metrics.jsonl", "optimizer.pt", "state.json", "model.safetensors"}
    assert {str(p.relative_to(run)): oct(p.stat().st_mode & 0o777) for p in files} == {
        str(p.relative_to(run)): "0o640" for p in files
    }


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


@pytest.mark.parametrize("fmt", ["coco", "yolo", "voc", "hf"])
def test_no_built_record_holds_an_absolute_path(mini, tmp_path, fmt):  # noqa: F811
    root, out = mini
    if fmt == "hf":
        args = [
            "build",
            "grounding",
            "--format",
            "hf",
            "--dataset",
            str(_embedded_detection_dataset(tmp_path / "det", rows=2)),
            "--out",
            str(out),
        ]
    else:
        args = _cli_args(fmt, root, out, ["--classes", str(root / "classes.txt")] if fmt == "yolo" else [])
    assert main(args) == 0
    records = load_records(out)
    for record in records:
        absolute = [
            s
            for s in _strings({k: v for k, v in record.items() if k != "images"})
            if s.startswith("/") or str(tmp_path) in s
        ]
        assert absolute == [], (fmt, absolute)
    source = records[0]["meta"]["source"]
    assert (out.parent / source).exists()  # relative to the output's folder, as image paths are


def test_hint_records_name_their_source_relative_to_the_output(tmp_path):
    problems = tmp_path / "in" / "gsm.jsonl"
    problems.parent.mkdir()
    problems.write_text(
        json.dumps({"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=7\n#### 7"}) + "\n"
    )
    out = tmp_path / "out" / "hints.jsonl"
    assert main(["build", "hints", "--input", str(problems), "--out", str(out)]) == 0
    assert load_records(out)[0]["meta"]["source"] == "../in/gsm.jsonl:1"
