"""The toy experiment's pipeline at its smallest size (seconds): task, tokenizer, teacher and
student training, distillation through the Trainer, `dopd eval`, table and curves."""

import json
import sys

from conftest import REPO

sys.path.insert(0, str(REPO))

from examples.toy_privilege import run as toy  # noqa: E402
from examples.toy_privilege.task import build_char_tokenizer, make_problem  # noqa: E402


def test_task_records_and_char_tokenizer_round_trip():
    import random

    from dopd_vl.data import validate_record

    rng = random.Random(0)
    problems = [make_problem(rng, i) for i in range(200)]
    for p in problems:
        validate_record(p)
        a, b = p["prompt"][0]["content"].rstrip("=").split("+")
        if b == "?":
            assert p["meta"]["question_type"] == "hidden_digit" and int(a) + int(p["privileged_context"][-1]) == int(p["answer"])
        else:
            assert p["privileged_context"] == "hint: none" and int(a) + int(b) == int(p["answer"])
    assert 60 < sum(p["meta"]["question_type"] == "hidden_digit" for p in problems) < 140
    tokenizer = build_char_tokenizer()
    text = tokenizer.apply_chat_template([{"role": "user", "content": "7+?=\n\nhint: ?=8"}], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text and tokenizer.unk_token_id not in ids  # every character is in the vocabulary
    assert tokenizer.eos_token == "<|im_end|>" and len(tokenizer) < 110


def test_toy_pipeline_smoke(tmp_path):
    payload = toy.run(tmp_path, toy.SIZES["smoke"], methods=("vanilla_opd", "dopd"))
    table = (tmp_path / "results.md").read_text()
    for row in ("| student (start) |", "| vanilla_opd |", "| dopd |", "| teacher, no context |", "| teacher, with context |"):
        assert row in table
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["results"]) == {"vanilla_opd", "dopd"} and saved["size"]["distill_steps"] == 2
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for method in ("vanilla_opd", "dopd"):
        report = json.loads((tmp_path / "eval" / f"{method}-seed0.json").read_text())
        assert report["privileged"] is False and report["count"] == 16
        assert len((tmp_path / "runs" / f"{method}-seed0" / "metrics.jsonl").read_text().splitlines()) == 2
    assert 0.0 <= payload["student_start"]["token_accuracy"] <= 1.0
