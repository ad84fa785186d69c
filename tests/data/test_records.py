"""Records from any source (dopd_vl/data/records.py): JSONL, Parquet with embedded images, save_to_disk
folders, load_dataset folders, TRL-style columns; detection datasets into the grounding builder;
portable builder outputs. Every dataset is made here, offline."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dopd_vl.cli import main
from dopd_vl.data.sources import load_records, records_root
from dopd_vl.errors import DatasetError
from dopd_vl.training.step import sample_step

from conftest import COCO128, REPO

pytestmark = pytest.mark.xdist_group("data_sources")  # with --dist loadgroup: one worker builds its fixture


def error_line(stderr: str) -> str:
    """The CLI's error message: exactly one line (progress bars of datasets / transformers aside)."""
    lines = [line for line in stderr.splitlines() if line.startswith("dopd ") and ": error: " in line]
    assert len(lines) == 1, stderr
    return lines[0]


SHAPES = REPO / "configs" / "data" / "shapes"


@pytest.fixture(scope="session")  # once per worker: xdist may interleave other modules between its tests
def grounding_sources(tmp_path_factory):
    """One grounding dataset, built four ways by `dopd build grounding`."""
    root = tmp_path_factory.mktemp("sources")
    base = [
        "build",
        "grounding",
        "--format",
        "coco",
        "--images",
        str(SHAPES / "images"),
        "--annotations",
        str(SHAPES / "annotations.json"),
    ]
    sources = {"jsonl": root / "data.jsonl", "parquet": root / "embedded.parquet", "disk": root / "disk_dataset"}
    assert main(base + ["--out", str(sources["jsonl"])]) == 0
    assert main(base + ["--out", str(sources["parquet"]), "--embed-images"]) == 0
    assert main(base + ["--out", str(sources["disk"])]) == 0  # image paths, relative to the folder
    (root / "hub_style" / "data").mkdir(parents=True)
    shutil.copy(sources["parquet"], root / "hub_style" / "data" / "train-00000-of-00001.parquet")
    sources["load_dataset"] = root / "hub_style"
    return sources


def test_every_source_gives_the_same_records(grounding_sources):
    from dopd_vl.data.images import image_parts, load_image

    reference = load_records(grounding_sources["jsonl"])
    for name, source in grounding_sources.items():
        records = load_records(source)
        assert len(records) == len(reference), name
        for a, b in zip(reference, records):
            assert {k: v for k, v in a.items() if k not in ("prompt", "images")} == {
                k: v for k, v in b.items() if k not in ("prompt", "images")
            }, name
            pixels = [np.asarray(load_image(ref, records_root(source), b["id"])) for ref in image_parts(b)]
            expected = [
                np.asarray(load_image(ref, records_root(grounding_sources["jsonl"]), a["id"])) for ref in image_parts(a)
            ]
            assert len(pixels) == len(expected) == 1 and np.array_equal(pixels[0], expected[0]), name
    embedded = load_records(grounding_sources["parquet"])[0]
    assert embedded["prompt"][0]["content"][0] == {"type": "image"} and isinstance(
        embedded["images"][0]["bytes"], bytes
    )


def _trainer(model_dir, data, out, extra=()):
    from dopd_vl.training.config import load_config
    from dopd_vl.training.trainer import Trainer

    config = load_config(
        None,
        [
            f"student.name_or_path={model_dir}",
            f"teacher.name_or_path={model_dir}",
            f"data.train={data}",
            f"output_dir={out}",
            "max_steps=1",
            "save_steps=100",
            "rollout.num_generations=2",
            "rollout.max_new_tokens=4",
            "optim.batch_size=2",
            "objective.top_k=16",
            *extra,
        ],
    )
    return Trainer(config)


def _first_step(trainer):
    batch = sample_step(trainer.run, trainer.step)[0]
    responses = [r.tolist() for r in batch.rollout.responses]
    return responses, trainer.train_step([batch])["loss"]


@pytest.mark.integration
def test_every_source_trains_the_same_first_step(grounding_sources, tiny_vl_dir, tmp_path):
    results = {
        name: _first_step(_trainer(tiny_vl_dir, source, tmp_path / name)) for name, source in grounding_sources.items()
    }
    reference = results.pop("jsonl")
    for name, (responses, loss) in results.items():
        assert responses == reference[0], name
        assert loss == pytest.approx(reference[1], rel=1e-6, abs=1e-9), name


@pytest.mark.integration
@pytest.mark.parametrize("style", ["strings", "messages", "renamed"])
def test_trl_style_text_datasets_train_without_conversion(tiny_text_dir, tmp_path, style):
    import datasets

    rows = [
        {"prompt": "What is 2 + 3?", "privileged_context": "Hint: add two and three.", "answer": "5"},
        {
            "prompt": "Tom has 5 apples and eats 2. How many are left?",
            "privileged_context": "Hint: subtract.",
            "answer": "3",
        },
    ]
    extra = []
    if style == "messages":
        rows = [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "privileged_context": [{"role": "user", "content": r["privileged_context"]}],
                "answer": r["answer"],
            }
            for r in rows
        ]
    if style == "renamed":
        rows = [{"question": r["prompt"], "hint": r["privileged_context"], "label": int(r["answer"])} for r in rows]
        extra = ["data.columns={prompt: question, privileged_context: hint, answer: label}"]
    path = tmp_path / "trl.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    records = load_records(
        path,
        columns={"prompt": "question", "privileged_context": "hint", "answer": "label"} if style == "renamed" else None,
    )
    assert (
        records[0]["prompt"] == [{"role": "user", "content": "What is 2 + 3?"}]
        and records[0]["privileged_context"] == "Hint: add two and three."
    )
    assert records[0]["answer"] == "5" and records[1]["id"] == "row-1"
    trainer = _trainer(tiny_text_dir, path, tmp_path / "run", extra)
    trainer.train()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and torch.isfinite(torch.tensor(metrics[0]["loss"])) and metrics[0]["response_length"] >= 1


def test_malformed_dataset_rows_give_one_line_errors(tmp_path, capsys, tiny_text_dir, tiny_vl_dir):
    import datasets

    def write(rows, name):
        path = tmp_path / f"{name}.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
        return path

    missing = write([{"question": "q?"}], "missing")
    with pytest.raises(DatasetError, match=r"missing column.*prompt"):
        load_records(missing)
    with pytest.raises(DatasetError, match=r"missing column.*nope"):
        load_records(missing, columns={"prompt": "question", "answer": "nope"})
    with pytest.raises(DatasetError, match=r"int_prompt.parquet row 0, record row-0, field prompt"):
        load_records(write([{"prompt": 5}], "int_prompt"))
    with pytest.raises(DatasetError, match="duplicate id"):
        load_records(write([{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}], "dup"))
    # An unreadable embedded image: the error names the record and the field when the image is used.
    from datasets import Image, List

    broken = datasets.Dataset.from_list(
        [
            {
                "id": "bad-image",
                "prompt": [
                    {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "q?"}]}
                ],
                "images": [{"bytes": b"not an image", "path": "x.png"}],
                "answer": "1",
            }
        ]
    ).cast_column("images", List(Image()))
    broken.to_parquet(str(tmp_path / "broken.parquet"))
    capsys.readouterr()
    assert main(["eval", "--model", str(tiny_vl_dir), "--data", str(tmp_path / "broken.parquet")]) == 1
    err = error_line(capsys.readouterr().err)
    assert "record bad-image" in err and "unreadable image" in err
    assert main(["eval", "--model", str(tiny_text_dir), "--data", str(tmp_path / "nowhere.parquet")]) == 1
    err = error_line(capsys.readouterr().err)
    assert "nowhere.parquet" in err


# ------------------------------------------------------------------ detection datasets (builder)
IMAGES = COCO128 / "images" / "train2017"
LABELS = COCO128 / "labels" / "train2017"


def _detection_dataset(tmp_path, bbox_format, normalized, stems, layout="dict"):
    """A local detection dataset with an objects column and a ClassLabel category feature, made
    from COCO128's YOLO labels, in the given box layout."""
    import datasets
    from PIL import Image as PILImage

    names = [n for n in (COCO128 / "classes.txt").read_text().split("\n") if n]
    rows = []
    for stem in stems:
        W, H = PILImage.open(IMAGES / f"{stem}.jpg").size
        boxes, cats = [], []
        for line in (LABELS / f"{stem}.txt").read_text().splitlines():
            c, xc, yc, w, h = line.split()
            xc, yc, w, h = float(xc), float(yc), float(w), float(h)
            sx, sy = (1.0, 1.0) if normalized or bbox_format == "yolo" else (W, H)
            if bbox_format == "coco":
                boxes.append([(xc - w / 2) * sx, (yc - h / 2) * sy, w * sx, h * sy])
            elif bbox_format == "pascal_voc":
                boxes.append([(xc - w / 2) * sx, (yc - h / 2) * sy, (xc + w / 2) * sx, (yc + h / 2) * sy])
            else:
                boxes.append([xc, yc, w, h])
            cats.append(int(c))
        objects = (
            {"bbox": boxes, "category": cats}
            if layout == "dict"
            else [{"bbox": b, "category": c} for b, c in zip(boxes, cats)]
        )
        rows.append({"image": str(IMAGES / f"{stem}.jpg"), "objects": objects})
    category = datasets.ClassLabel(names=names)
    objects_feature = (
        {"bbox": datasets.List(datasets.List(datasets.Value("float64"))), "category": datasets.List(category)}
        if layout == "dict"
        else datasets.List({"bbox": datasets.List(datasets.Value("float64")), "category": category})
    )
    features = datasets.Features({"image": datasets.Image(), "objects": objects_feature})
    dataset = datasets.Dataset.from_list(rows, features=features)
    path = tmp_path / f"det_{bbox_format}_{normalized}_{layout}"
    dataset.save_to_disk(str(path))
    return path


def _boxes_by_image(records):
    """Image stem -> sorted (label, 0-1000 box) of its records (objects=all: every record has them all)."""

    def stem(r):  # a path, or the name an embedded image was saved with
        return Path(r["prompt"][0]["content"][0].get("image") or r["images"][0]["path"]).stem

    return {
        stem(r): sorted((o["label"], o["bbox_2d"]) for o in json.loads(r["privileged_context"].split(": ", 1)[1]))
        for r in records
    }


@pytest.mark.skipif(not IMAGES.is_dir(), reason="../shared/data/coco128 is not beside the clone")
@pytest.mark.parametrize(
    "bbox_format,normalized,layout",
    [
        ("coco", False, "dict"),
        ("coco", True, "list"),
        ("pascal_voc", False, "list"),
        ("pascal_voc", True, "dict"),
        ("yolo", False, "dict"),
    ],
)
def test_detection_datasets_build_the_same_boxes_as_the_yolo_files(tmp_path, bbox_format, normalized, layout):
    stems = sorted(p.stem for p in LABELS.glob("*.txt") if (IMAGES / f"{p.stem}.jpg").exists())[:12]
    (tmp_path / "labels").mkdir()
    for stem in stems:
        shutil.copy(LABELS / f"{stem}.txt", tmp_path / "labels")
    (tmp_path / "images").mkdir()
    for stem in stems:
        shutil.copy(IMAGES / f"{stem}.jpg", tmp_path / "images")
    yolo_out, hf_out = (
        tmp_path / "yolo.jsonl",
        tmp_path / "hf.parquet",
    )  # save_to_disk embedded the images: a dataset output keeps them
    assert (
        main(
            [
                "build",
                "grounding",
                "--format",
                "yolo",
                "--images",
                str(tmp_path / "images"),
                "--annotations",
                str(tmp_path / "labels"),
                "--classes",
                str(COCO128 / "coco128.yaml"),
                "--out",
                str(yolo_out),
                "--objects",
                "all",
            ]
        )
        == 0
    )
    dataset = _detection_dataset(tmp_path, bbox_format, normalized, stems, layout)
    args = [
        "build",
        "grounding",
        "--format",
        "hf",
        "--dataset",
        str(dataset),
        "--bbox-format",
        bbox_format,
        "--out",
        str(hf_out),
        "--objects",
        "all",
    ]
    assert main(args + (["--normalized"] if normalized else [])) == 0
    yolo, hf = _boxes_by_image(load_records(yolo_out)), _boxes_by_image(load_records(hf_out))
    assert set(yolo) == set(hf) == set(stems)
    for stem in stems:
        assert len(yolo[stem]) == len(hf[stem])
        for (la, ba), (lb, bb) in zip(yolo[stem], hf[stem]):
            assert la == lb and all(abs(a - b) <= 1 for a, b in zip(ba, bb)), (stem, ba, bb)


@pytest.mark.skipif(not IMAGES.is_dir(), reason="../shared/data/coco128 is not beside the clone")
def test_detection_dataset_faults_fail_in_one_line_or_are_skipped(tmp_path, capsys):
    import datasets

    stems = sorted(p.stem for p in LABELS.glob("*.txt") if (IMAGES / f"{p.stem}.jpg").exists())[:3]
    good = _detection_dataset(tmp_path, "coco", False, stems)
    rows = datasets.load_from_disk(str(good)).cast_column("image", datasets.Image(decode=False)).to_list()
    rows[1]["objects"]["bbox"][0][2] = float("nan")
    bad = tmp_path / "bad_dataset"
    datasets.Dataset.from_list(rows, features=datasets.load_from_disk(str(good)).features).save_to_disk(str(bad))
    out = tmp_path / "out.parquet"
    args = ["build", "grounding", "--format", "hf", "--dataset", str(bad), "--out", str(out)]
    assert main(args) == 1
    err = error_line(capsys.readouterr().err)
    assert "row 1 object 0" in err and "non-finite" in err and not out.exists()
    assert main(args + ["--on-error", "skip"]) == 0
    skipped = [json.loads(line) for line in Path(out).with_suffix(".skipped.jsonl").read_text().splitlines()]
    built = {r["images"][0]["path"] for r in load_records(out)}
    assert [s["id"] for s in skipped] == ["row 1"] and built == {f"{stems[0]}.jpg", f"{stems[2]}.jpg"}
    assert (
        main(
            ["build", "grounding", "--format", "hf", "--dataset", str(good), "--out", str(out), "--bbox-format", "coco"]
        )
        == 0
    )
    # Image paths as strings resolve inside the dataset's folder and may not leave it.
    local = tmp_path / "local_paths"
    (local / "images").mkdir(parents=True)
    shutil.copy(IMAGES / f"{stems[0]}.jpg", local / "images")
    plain = datasets.Features(
        {"image": datasets.Value("string"), "objects": datasets.load_from_disk(str(good)).features["objects"]}
    )
    first = datasets.load_from_disk(str(good)).cast_column("image", datasets.Image(decode=False))[0]["objects"]
    datasets.Dataset.from_list([{"image": f"images/{stems[0]}.jpg", "objects": first}], features=plain).to_parquet(
        str(local / "data.parquet")
    )
    assert (
        main(
            [
                "build",
                "grounding",
                "--format",
                "hf",
                "--dataset",
                str(local / "data.parquet"),
                "--out",
                str(local / "out.jsonl"),
            ]
        )
        == 0
    )
    assert f"images/{stems[0]}.jpg" in (local / "out.jsonl").read_text()
    datasets.Dataset.from_list([{"image": "../../secret.jpg", "objects": first}], features=plain).to_parquet(
        str(local / "escape.parquet")
    )
    assert (
        main(
            [
                "build",
                "grounding",
                "--format",
                "hf",
                "--dataset",
                str(local / "escape.parquet"),
                "--out",
                str(local / "x.jsonl"),
            ]
        )
        == 1
    )
    assert "escapes the dataset root" in error_line(capsys.readouterr().err)
    # A dataset without the objects column.
    datasets.Dataset.from_list(
        [{"image": str(IMAGES / f"{stems[0]}.jpg")}], features=datasets.Features({"image": datasets.Image()})
    ).save_to_disk(str(tmp_path / "no_objects"))
    assert (
        main(
            [
                "build",
                "grounding",
                "--format",
                "hf",
                "--dataset",
                str(tmp_path / "no_objects"),
                "--out",
                str(tmp_path / "x.jsonl"),
            ]
        )
        == 1
    )
    assert "missing column 'objects'" in capsys.readouterr().err


def test_builder_outputs_are_atomic_and_embedding_needs_a_dataset_output(tmp_path, capsys):
    base = [
        "build",
        "grounding",
        "--format",
        "coco",
        "--images",
        str(SHAPES / "images"),
        "--annotations",
        str(SHAPES / "annotations.json"),
    ]
    out = tmp_path / "x.jsonl"
    assert main(base + ["--out", str(out), "--embed-images"]) == 1
    assert "--embed-images needs" in capsys.readouterr().err and not out.exists()
    folder = tmp_path / "folder"
    assert main(base + ["--out", str(folder)]) == 0
    first = sorted(p.name for p in folder.iterdir())
    assert main(base + ["--out", str(folder), "--embed-images"]) == 0  # replaces the folder whole
    assert sorted(p.name for p in folder.iterdir()) == first and isinstance(
        load_records(folder)[0]["images"][0]["bytes"], bytes
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_trusted_image_roots_file_lists_folders_once_and_ignores_what_it_cannot_use(tmp_path, monkeypatch, caplog):
    from dopd_vl.data.image_roots import image_roots, trust_image_roots, trusted_image_roots, trusted_roots_file

    monkeypatch.setenv("DOPD_VL_CONFIG_DIR", str(tmp_path / "config"))
    assert trusted_image_roots() == [] and trusted_roots_file() == tmp_path / "config" / "image_roots.txt"
    (tmp_path / "coco" / "train").mkdir(parents=True)
    assert trust_image_roots([tmp_path / "coco", tmp_path / "coco" / "train"]) == [
        tmp_path / "coco"
    ]  # the inner folder is covered
    assert trust_image_roots([tmp_path / "coco" / "train"]) == []
    with trusted_roots_file().open("a") as f:
        f.write("relative/images  # not absolute: ignored with a warning\n")
    assert trusted_image_roots() == [tmp_path / "coco"] and "not an absolute path" in caplog.text
    roots = image_roots(tmp_path / "data", [tmp_path / "extra"])
    assert roots.allowed == (tmp_path / "data", tmp_path / "extra", tmp_path / "coco")
    assert roots.resolve("../coco/train/a.png", "r1") == tmp_path / "coco" / "train" / "a.png"
    with pytest.raises(
        DatasetError, match=r"record r2, field prompt.image: image path '/etc/passwd' resolves to /etc/passwd, outside"
    ):
        roots.resolve("/etc/passwd", "r2")
