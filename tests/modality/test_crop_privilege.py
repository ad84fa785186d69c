"""Image privileged context: the `crop` format, the record schema, aligned views on a tiny
Qwen3-VL, the builder's outputs, and one Vision-OPD training step (docs/design.md §3.1, §3.2)."""

import json
import math

import pytest
import torch
from PIL import Image

from data_builders.grounding import build_grounding, load_annotations
from data_builders.privileged import CropFormat, get_format
from dopd_vl.cli import main
from dopd_vl.data.schema import context_text, validate_record
from dopd_vl.data.sources import load_records
from dopd_vl.errors import DatasetError
from dopd_vl.method.views import VIEWS
from dopd_vl.modality.adapters import make_adapter
from dopd_vl.modality.batches import build_views, response_hidden_states
from dopd_vl.modality.prompts import prompt_messages
from dopd_vl.modality.vision import MIN_CROP_SIDE, crop_image
from dopd_vl.models.loading import load_model, load_processing

from conftest import REPO

SHAPES = REPO / "configs" / "data" / "shapes"
IMAGE_PAD = "<|image_pad|>"


pytestmark = pytest.mark.xdist_group("crop_dataset")  # with --dist loadgroup: one worker builds its fixture


@pytest.fixture(scope="session")  # once per worker: xdist may interleave other modules between its tests
def crop_dataset(tmp_path_factory):
    """The shipped generated scenes built again with `--privileged-format crop`."""
    out = tmp_path_factory.mktemp("crop") / "data.jsonl"
    assert (
        main(
            [
                "build",
                "grounding",
                "--format",
                "coco",
                "--images",
                str(SHAPES / "images"),
                "--annotations",
                str(SHAPES / "annotations.json"),
                "--privileged-format",
                "crop",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def test_crop_format_is_the_union_of_the_boxes_with_a_margin():
    fmt = get_format("crop")
    privileged = {
        "image_size": [160, 120],
        "objects": [{"label": "a", "bbox_px": [10, 20, 30, 40]}, {"label": "b", "bbox_px": [50, 30, 70, 60]}],
    }
    # union [10, 20, 70, 60], 60 x 40, margin 0.25 -> 15 / 10 on each side
    assert fmt.render(privileged) == [{"type": "text", "text": fmt.lead_in}, {"type": "image", "crop": [0, 10, 85, 70]}]
    near_edge = {"image_size": [100, 100], "objects": [{"label": "a", "bbox_px": [80, 90, 100, 100]}]}
    assert CropFormat(margin=0.5).crop_box(near_edge) == [70, 85, 100, 100]  # clamped to the image
    with pytest.raises(ValueError, match="grounding sources"):
        fmt.render({"hints": ["x"]})


def test_crop_pixels_and_minimum_side():
    image = Image.new("RGB", (100, 80))
    image.putpixel((40, 30), (255, 0, 0))
    crop = crop_image(image, [40, 30, 90, 70], "r")
    assert crop.size == (50, 40) and crop.getpixel((0, 0)) == (255, 0, 0)
    small = crop_image(image, [95, 0, 100, 4], "r")  # 5 x 4: grown to 32 x 32 inside the image
    assert small.size == (MIN_CROP_SIDE, MIN_CROP_SIDE)
    with pytest.raises(DatasetError, match="outside"):
        crop_image(image, [0, 0, 120, 10], "rec7")


def test_schema_accepts_crop_parts_and_names_bad_ones():
    record = {
        "id": "r1",
        "prompt": [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "q"}]}],
        "privileged_context": [{"type": "text", "text": "look"}, {"type": "image", "crop": [1, 2, 30, 40]}],
    }
    validate_record(record)
    assert context_text(record["privileged_context"]) == "look\n<image: crop [1, 2, 30, 40] of prompt image 0>"
    for bad, field in (
        ([{"type": "image", "crop": [5, 2, 3, 40]}], r"privileged_context\[0\]\.crop"),
        ([{"type": "image", "crop": [1, 2, 3, 4], "image_index": 1}], r"privileged_context\[0\]\.image_index"),
        ([{"type": "image", "image": "b.png"}], r"privileged_context\[0\]"),
        ([], "privileged_context"),
    ):
        with pytest.raises(DatasetError, match=field):
            validate_record({**record, "privileged_context": bad})


def test_builder_writes_crops_and_they_survive_parquet(crop_dataset, tmp_path):
    records = load_records(crop_dataset)
    first = records[0]
    crop = first["privileged_context"][1]["crop"]
    assert first["privileged"]["format"] == "crop" and first["privileged_context"][1]["type"] == "image"
    assert crop == CropFormat().crop_box(first["privileged"])
    report = build_grounding(
        load_annotations("coco", SHAPES / "images", SHAPES / "annotations.json"),
        tmp_path / "data.parquet",
        privileged_format="crop",
    )
    back = load_records(tmp_path / "data.parquet")
    assert [r["privileged_context"] for r in back] == [r["privileged_context"] for r in report.records]


def test_crop_view_places_the_crop_after_the_image_and_aligns_responses(tiny_vl_dir, crop_dataset):
    processing = load_processing(tiny_vl_dir)
    adapter = make_adapter(processing, image_root=crop_dataset.parent)
    records = load_records(crop_dataset)[:3]
    messages = prompt_messages(records[0], "teacher_priv")
    assert [p["type"] for p in messages[-1]["content"]] == ["image", "text", "text", "image"]
    pad_id = processing.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    merge = processing.image_processor.merge_size**2
    for record in records:
        plain, priv = adapter.prompt(record, "student"), adapter.prompt(record, "teacher_priv")
        grid = priv.extras["image_grid_thw"]
        assert grid.shape[0] == 2 and torch.equal(grid[0], plain.extras["image_grid_thw"][0])
        # every image's placeholder run has exactly its grid's tokens; the crop's pixels are the box's
        assert int((priv.input_ids == pad_id).sum()) == int(grid.prod(-1).sum()) // merge
        assert priv.extras["pixel_values"].shape[0] == int(grid.prod(-1).sum())
        image = Image.open(crop_dataset.parent / record["prompt"][0]["content"][0]["image"]).convert("RGB")
        box = record["privileged_context"][1]["crop"]
        expected = adapter.processor.image_processor(images=[crop_image(image, box, record["id"])], return_tensors="pt")
        assert torch.equal(grid[1], expected["image_grid_thw"][0])
        assert torch.allclose(priv.extras["pixel_values"][int(grid[0].prod()) :], expected["pixel_values"])
    g = torch.Generator().manual_seed(0)
    responses = [torch.cat([torch.randint(100, 20000, (n,), generator=g), torch.tensor([151645])]) for n in (4, 1, 6)]
    views = build_views({"student": adapter, "teacher": adapter}, VIEWS, records, responses)  # check_aligned inside
    model = load_model(tiny_vl_dir).eval()
    with torch.no_grad():
        hidden = {v: response_hidden_states(model, b) for v, b in views.items()}
    for batch in views.values():
        assert torch.equal(batch.response_ids, views["student"].response_ids)
        assert (
            batch.inputs["input_ids"].gather(1, batch.response_positions + 1)[batch.response_mask].tolist()
            == views["student"].response_ids[batch.response_mask].tolist()
        )
    assert not torch.allclose(
        hidden["teacher_priv"][views["student"].response_mask], hidden["student"][views["student"].response_mask]
    )


def test_text_models_reject_an_image_context(tiny_text_dir):
    record = {
        "id": "t1",
        "prompt": [{"role": "user", "content": "2+2?"}],
        "privileged_context": [{"type": "text", "text": "four"}],
    }
    adapter = make_adapter(load_processing(tiny_text_dir))
    assert "four" in adapter.prompt(record, "teacher_priv").text  # text parts work for text models
    image_record = {
        **record,
        "prompt": [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "?"}]}],
        "privileged_context": [{"type": "image", "crop": [0, 0, 4, 4]}],
    }
    with pytest.raises(DatasetError, match="text-only"):
        adapter.prompt(image_record, "teacher_priv")


@pytest.mark.integration
def test_vision_opd_trains_a_step_on_crops_and_needs_them(crop_dataset, tmp_path):
    recipe = REPO / "configs" / "baselines" / "vision_opd.yaml"
    tiny = [
        "student.name_or_path=tiny:qwen3-vl",
        "student.dtype=float32",
        "max_steps=1",
        "save_steps=1",
        "gradient_checkpointing=false",
        "rollout.max_new_tokens=4",
        "rollout.num_generations=2",
        "optim.batch_size=2",
        "optim.gradient_accumulation_steps=1",
        "objective.top_k=16",
    ]
    run = tmp_path / "run"
    assert main(["train", str(recipe), f"data.train={crop_dataset}", f"output_dir={run}", *tiny]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # a random tiny model barely reads the crop, so the divergence is tiny, but it is there
    assert metrics[0]["step"] == 1 and math.isfinite(metrics[0]["loss"]) and metrics[0]["grad_norm"] > 0
    assert (run / "final" / "model.safetensors").exists()
    # boxes as text are not Vision-OPD's privileged input: a clear error naming the file and field
    assert (
        main(["train", str(recipe), f"data.train={SHAPES / 'data.jsonl'}", f"output_dir={tmp_path / 'bad'}", *tiny])
        == 1
    )
