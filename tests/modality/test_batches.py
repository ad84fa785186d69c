"""Aligned views: padded batches equal unpadded single records; same response ids in every view."""

import pytest
import torch

from dopd_vl.data.sources import load_records
from dopd_vl.errors import DatasetError
from dopd_vl.method.views import VIEWS
from dopd_vl.modality.adapters import make_adapter
from dopd_vl.modality.batches import build_view, build_views, check_aligned, response_hidden_states
from dopd_vl.modality.prompts import prompt_messages
from dopd_vl.models.loading import load_model, load_processing


def _responses(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Ordinary text ids, each response ending with <|im_end|>.
    return [torch.cat([torch.randint(100, 20000, (n - 1,), generator=g), torch.tensor([151645])]) for n in lengths]


def _assert_batch_equals_single(model, adapters, records, responses):
    views = build_views(adapters, VIEWS, records, responses)
    for view, batch in views.items():
        adapter = adapters["teacher" if view.startswith("teacher") else "student"]
        with torch.no_grad():
            batched = response_hidden_states(model, batch)
            for b, (record, response) in enumerate(zip(records, responses)):
                single = build_view(adapter, view, [record], [response])
                assert single.inputs["attention_mask"].all()  # alone: no padding at all
                alone = response_hidden_states(model, single)[0]
                n = response.numel()
                diff = (batched[b, :n] - alone[:n]).abs().max().item()
                assert diff < 1e-4, (view, b, diff)
                assert torch.equal(batch.response_ids[b, :n], response)
                assert batch.response_mask[b].sum() == n


def test_vision_views_batched_equal_alone(tiny_vl_dir, image_dataset):
    model = load_model(tiny_vl_dir).eval()
    adapter = make_adapter(load_processing(tiny_vl_dir), image_root=image_dataset.parent)
    records = load_records(image_dataset)
    prompts = [adapter.prompt(r, "student") for r in records]
    assert len({p.input_ids.numel() for p in prompts}) == 3  # different prompt lengths
    assert len({tuple(p.extras["image_grid_thw"][0].tolist()) for p in prompts}) == 3  # different image sizes
    _assert_batch_equals_single(model, {"student": adapter, "teacher": adapter}, records, _responses([5, 2, 7]))


def test_text_views_batched_equal_alone(tiny_text_dir, text_records):
    model = load_model(tiny_text_dir).eval()
    adapter = make_adapter(load_processing(tiny_text_dir))
    _assert_batch_equals_single(model, {"student": adapter, "teacher": adapter}, text_records, _responses([3, 8, 1]))


def test_privileged_context_is_the_last_text_of_the_last_user_turn(text_records, image_dataset):
    rec = text_records[1]
    msgs = prompt_messages(rec, "teacher_priv")
    assert msgs[-1]["content"] == rec["prompt"][0]["content"] + "\n\n" + rec["privileged_context"]
    assert prompt_messages(rec, "student") == rec["prompt"] and prompt_messages(rec, "teacher_plain") == rec["prompt"]
    vrec = load_records(image_dataset)[0]
    parts = prompt_messages(vrec, "student_priv")[-1]["content"]
    assert parts[0]["type"] == "image" and parts[-1]["text"].endswith(vrec["privileged_context"])
    # Question before the image: p becomes a new final part, after the image.
    swapped = {**vrec, "prompt": [{"role": "user", "content": list(reversed(vrec["prompt"][0]["content"]))}]}
    parts = prompt_messages(swapped, "teacher_priv")[-1]["content"]
    assert [p["type"] for p in parts] == ["text", "image", "text"] and parts[-1]["text"] == vrec["privileged_context"]


def test_text_prompts_are_non_thinking_and_share_template_arguments(tiny_text_dir, text_records):
    adapter = make_adapter(load_processing(tiny_text_dir))
    for view in VIEWS:
        assert adapter.prompt(text_records[0], view).text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_missing_privileged_context_is_an_error_only_for_privileged_views(tiny_text_dir, text_records):
    adapter = make_adapter(load_processing(tiny_text_dir))
    record = {k: v for k, v in text_records[0].items() if k != "privileged_context"}
    for view in ("student", "teacher_plain"):
        adapter.prompt(record, view)
    for view in ("teacher_priv", "student_priv"):
        with pytest.raises(DatasetError, match=r"record t0, field privileged_context"):
            adapter.prompt(record, view)


def test_views_with_different_response_ids_name_the_record(tiny_text_dir, text_records):
    adapter = make_adapter(load_processing(tiny_text_dir))
    responses = _responses([3, 4, 2])
    views = build_views({"student": adapter, "teacher": adapter}, ("student", "teacher_priv"), text_records, responses)
    views["teacher_priv"].inputs["input_ids"][1, views["teacher_priv"].response_positions[1, 2] + 1] += 1
    with pytest.raises(DatasetError, match="record t1, field response_ids"):
        check_aligned(views)


def test_image_paths_resolve_against_the_dataset_folder_and_missing_images_are_named(tiny_vl_dir, image_dataset):
    adapter = make_adapter(load_processing(tiny_vl_dir), image_root=image_dataset.parent / "images")
    record = load_records(image_dataset)[0]
    up = {
        **record,
        "prompt": [
            {
                "role": "user",
                "content": [{"type": "image", "image": "../images/img0.png"}, {"type": "text", "text": "q"}],
            }
        ],
    }
    assert adapter.prompt(up, "student").extras["image_grid_thw"].shape == (1, 3)
    adapter = make_adapter(load_processing(tiny_vl_dir), image_root=image_dataset.parent)
    missing = {
        **record,
        "prompt": [
            {"role": "user", "content": [{"type": "image", "image": "images/none.png"}, {"type": "text", "text": "q"}]}
        ],
    }
    with pytest.raises(DatasetError, match="record rec0, field prompt.image: image not found"):
        adapter.prompt(missing, "student")
