"""The three recipes of CONTRIBUTING.md, followed step by step: a new objective, a new privileged
format, a new modality adapter. Each ends in real use (a training step, a build, aligned views)."""

import json
import sys

import pytest
import torch

from conftest import REPO


# ------------------------------------------------------------------------ recipe 1: an objective
def build_confident_teacher(config):
    """A route table + router: reverse KL (full) to the privileged teacher on the tokens where it is at
    least as confident as its step threshold; no loss elsewhere."""
    from dopd_vl.method.objectives import Objective, Route

    def router(signals, thresholds):
        return torch.where(signals.q_teacher >= thresholds["q_teacher"], 0, -1)

    return Objective(config, router, (Route("teacher_priv", "rkl", "full", 1.0),))


@pytest.mark.integration
def test_recipe_new_objective(tiny_text_dir, text_records, tmp_path):
    from dopd_vl.loss.reference import objective_loss
    from dopd_vl.method.objectives import ObjectiveConfig, build_objective, register_objective
    from dopd_vl.training.config import load_config
    from dopd_vl.training.trainer import Trainer

    register_objective("confident_teacher", build_confident_teacher)  # step 2
    objective = build_objective(ObjectiveConfig(name="confident_teacher", outlier_fraction=0.0))
    assert objective.views == ("teacher_priv", "student_priv")  # only what the router and routes need

    # Step 4: against a hand computation on a 3-word vocabulary, one sequence of 3 tokens (id 0).
    student = torch.tensor([[[0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.6, 0.2, 0.2]]], dtype=torch.float64)
    teacher = torch.tensor([[[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.7, 0.2, 0.1]]], dtype=torch.float64)
    spriv = torch.full((1, 3, 3), 1 / 3, dtype=torch.float64)
    out = objective_loss(
        objective,
        student.log(),
        {"teacher_priv": teacher.log(), "student_priv": spriv.log()},
        torch.zeros(1, 3, dtype=torch.long),
        torch.ones(1, 3, dtype=torch.bool),
    )
    # q_T of token 0 = 0.9, 0.1, 0.7; threshold = their mean 0.5667: tokens 0 and 2 are routed.
    rkl = lambda s, t: sum(a * (torch.log(a) - torch.log(b)) for a, b in zip(s, t))  # noqa: E731
    expected = [rkl(student[0, 0], teacher[0, 0]).item(), 0.0, rkl(student[0, 2], teacher[0, 2]).item()]
    assert out.route.tolist() == [[0, -1, 0]]
    assert out.token_loss[0].tolist() == pytest.approx(expected, rel=1e-9)
    assert out.loss.item() == pytest.approx(sum(expected) / 3, rel=1e-9)

    # Step 3: train, by registered name and by module:builder.
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in text_records))
    for name in ("confident_teacher", "test_contributing:build_confident_teacher"):
        run = tmp_path / name.replace(":", "_")
        config = load_config(
            None,
            [
                f"student.name_or_path={tiny_text_dir}",
                f"teacher.name_or_path={tiny_text_dir}",
                f"data.train={data}",
                f"output_dir={run}",
                f"objective.name={name}",
                "max_steps=1",
                "save_steps=10",
                "rollout.num_generations=2",
                "rollout.max_new_tokens=4",
                "optim.batch_size=3",
            ],
        )
        Trainer(config).train()
        metrics = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
        assert (
            torch.isfinite(torch.tensor(metrics["loss"]))
            and abs(sum(metrics[f"frac/{r}"] for r in ("LH", "LL", "HT", "HS")) - 1) < 1e-9
        )


# ------------------------------------------------------------------ recipe 2: a privileged format
class CountSentence:
    """Boxes as one sentence: 'The image shows 2 dogs and 1 cat.'"""

    name = "count_sentence"

    def render(self, privileged: dict) -> str:
        from collections import Counter

        counts = Counter(o["label"] for o in privileged["objects"])
        parts = [f"{n} {label}{'s' if n > 1 else ''}" for label, n in sorted(counts.items())]
        return "The image shows " + " and ".join(parts) + "."


def test_recipe_new_privileged_format(tmp_path):
    import numpy as np
    from PIL import Image

    from data_builders.grounding import build_grounding, load_annotations
    from data_builders.privileged import get_format, register_format
    from dopd_vl.data.sources import load_records

    register_format(CountSentence(), overwrite=True)  # step 2
    assert get_format("count_sentence").name == "count_sentence"
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8)).save(tmp_path / "images" / "a.png")
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 60, "height": 40}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [20, 1, 10, 10]},
            {"id": 3, "image_id": 1, "category_id": 2, "bbox": [40, 20, 10, 10]},
        ],
        "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    images = load_annotations("coco", tmp_path / "images", tmp_path / "coco.json")
    build_grounding(images, tmp_path / "out.jsonl", privileged_format="count_sentence", objects="all")  # step 3
    records = load_records(tmp_path / "out.jsonl")
    assert {r["privileged_context"] for r in records} == {"The image shows 1 cat and 2 dogs."}
    assert all(r["privileged"]["format"] == "count_sentence" for r in records)


# -------------------------------------------------------------------- recipe 3: a modality adapter
class CompletionAdapter:
    """Base models without a chat template: 'Question: ...\\nContext: ...\\nAnswer:'."""

    modality = "text"

    def __init__(self, tokenizer, config, image_root=None):
        self.tokenizer, self.config = tokenizer, config
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def prompt(self, record, view):
        from dopd_vl.modality.prompts import PromptInputs, prompt_messages

        messages = prompt_messages(record, view, "{prompt}\nContext: {privileged_context}")  # the one place p enters
        text = "".join(f"Question: {m['content']}\n" for m in messages if m["role"] == "user") + "Answer:"
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
        return PromptInputs(input_ids=ids.long(), text=text)


def test_recipe_new_modality_adapter(tmp_path, text_records):
    sys.path.insert(0, str(REPO))
    from dopd_vl import build_char_tokenizer
    from dopd_vl.modality.adapters import make_adapter, register_adapter
    from dopd_vl.modality.batches import build_views

    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = None  # a base model's tokenizer
    register_adapter(
        "completion", lambda processing: getattr(processing, "chat_template", "") is None, CompletionAdapter
    )  # step 2
    adapter = make_adapter(tokenizer)
    assert isinstance(adapter, CompletionAdapter)
    record = {"id": "a", "prompt": [{"role": "user", "content": "7+?="}], "privileged_context": "hint: ?=8"}
    assert adapter.prompt(record, "teacher_priv").text == "Question: 7+?=\nContext: hint: ?=8\nAnswer:"
    assert adapter.prompt(record, "student").text == "Question: 7+?=\nAnswer:"
    # Step 3: the engine's views use it, and the response lines up in every view.
    response = torch.tensor(tokenizer("15", add_special_tokens=False).input_ids + [tokenizer.eos_token_id])
    views = build_views(
        {"student": adapter, "teacher": adapter},
        ("student", "teacher_priv", "student_priv", "teacher_plain"),
        [record],
        [response],
    )
    for view in views.values():
        assert view.response_ids[0][view.response_mask[0]].tolist() == response.tolist()
    # Tokenizers with a chat template still get the built-in text adapter.
    assert type(make_adapter(build_char_tokenizer())).__name__ == "TextAdapter"
