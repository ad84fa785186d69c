"""The boxes-lie study (examples/visual_privilege/boxes_lie.py): the grid scenes' questions and the
simulated detector checked by hand and by counting, and the pipeline at its smallest size."""

import json
import random
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))

from examples.visual_privilege import boxes_lie, grid  # noqa: E402


def B(label: str, row: int, col: int) -> grid.Box:
    return grid.Box(label, grid.cell_box(row, col))


def test_answers_from_objects_by_hand():
    scene = [B("red square", 0, 0), B("blue circle", 1, 3), B("red circle", 2, 1)]
    assert [grid.answer(k, scene) for k in grid.QUESTION_TYPES] == ["3", "2", "no"]
    assert [grid.answer(k, [*scene, B("yellow circle", 3, 3)]) for k in grid.QUESTION_TYPES] == ["4", "2", "yes"]
    assert [q["answer"] for q in grid.questions(scene[1:2])] == ["1", "0", "no"]
    with pytest.raises(ValueError, match="unknown question type 'shape'"):
        grid.answer("shape", scene)
    # one token per object: a cell is 32 px, Qwen3-VL's 16 px patches merged 2 x 2
    assert grid.cell_box(1, 3) == (3 * 32 + 3, 32 + 3, 4 * 32 - 3, 2 * 32 - 3)


def test_the_text_only_baseline_is_the_majority_answer_per_type():
    asked = (
        [{"type": "count", "answer": a} for a in ("2", "2", "3")]
        + [{"type": "count_red", "answer": a} for a in ("0", "1", "0")]
        + [{"type": "exists_yellow", "answer": "no"}]
    )
    heldout = [{"type": "count", "answer": "2"}, {"type": "count", "answer": "4"}, {"type": "count_red", "answer": "0"}]
    result = grid.majority_accuracy(asked, heldout)
    assert result["answers"] == {"count": "2", "count_red": "0", "exists_yellow": "no"}
    assert result["accuracy"] == pytest.approx(2 / 3) and result["per_type"] == {"count": 0.5, "count_red": 1.0}


def test_the_detector_lies_at_its_rates_and_scores_its_right_boxes_higher():
    rng = random.Random(1)
    scenes = [grid.make_scene(rng) for _ in range(600)]
    clean = [grid.detect(s, 0.0, random.Random(k)) for k, s in enumerate(scenes)]
    assert all([p.label for p in d] == [o.label for o in s] for d, s in zip(clean, scenes))
    assert all(
        abs(p.box[i] - o.box[i]) <= grid.JITTER for d, s in zip(clean, scenes) for p, o in zip(d, s) for i in range(4)
    )
    objects = sum(len(s) for s in scenes)
    right, wrong, invented = [], [], 0
    det = random.Random(2)
    for s in scenes:
        for p in grid.detect(s, 0.3, det):
            cell = (int(p.box[1] + grid.JITTER) // grid.CELL, int(p.box[0] + grid.JITTER) // grid.CELL)
            truth = next((o for o in s if (o.box[1] // grid.CELL, o.box[0] // grid.CELL) == cell), None)
            if truth is None:
                invented += 1
                wrong.append(p.score)
            elif truth.label == p.label:
                right.append(p.score)
            else:
                assert p.label == f"{grid.CONFUSED[truth.colour]} {truth.shape}"
                wrong.append(p.score)
    kept = len(right) + len(wrong) - invented
    assert kept / objects == pytest.approx(0.7, abs=0.04)  # missed at 0.3
    assert (len(wrong) - invented) / kept == pytest.approx(0.3, abs=0.04)  # mislabelled at 0.3
    assert invented / objects == pytest.approx(0.3, abs=0.04)
    assert sum(right) / len(right) > sum(wrong) / len(wrong) + 0.25  # a calibrated detector's ordering


def test_every_method_is_a_valid_recipe():
    """Each METHODS spec parses to a registered objective whose overrides the recipe accepts."""
    from dopd_vl import load_config

    labels = []
    for spec in boxes_lie.METHODS:
        label, name, overrides = boxes_lie.toy.parse_method(spec)
        config = load_config(boxes_lie.HERE / "config.yaml", [f"objective.name={name}", *overrides])
        assert config.objective.name == name
        labels.append(label)
    assert sorted(labels) == sorted(boxes_lie.LABELS)


def test_boxes_lie_pipeline_smoke(tmp_path):
    """The study at its smallest size, two methods: detector results through the package's reader,
    the dev selection, the runs, the readout, the tables, the figure and the measured cells."""
    from dopd_vl import load_records

    payload = boxes_lie.run_study(tmp_path, boxes_lie.SIZES["smoke"], methods=boxes_lie.METHODS[-1:], workers=1)
    text = (tmp_path / "results.md").read_text()
    for row in ("| text-only (majority answer per type) |", "| 0.3 | dopd_initial_verified |", "HS precision"):
        assert row in text
    assert set(payload["selection"]["chosen"]) == {"dopd_initial_verified"}
    study = json.loads((tmp_path / "boxes_lie_study.json").read_text())
    assert study == boxes_lie.study_summary(payload) and [c["rate"] for c in study["cells"]] == [0.3]
    assert (tmp_path / "boxes_lie.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the records carry the detector's boxes with their scores, and box_right is what those boxes answer
    scenes = tmp_path / "seed0" / "scenes"
    queries = {q["id"]: q for q in map(json.loads, (scenes / "questions.jsonl").read_text().splitlines())}
    records = load_records(boxes_lie.data_path(tmp_path, 0, 0.3, "train"))  # the teacher learned on rate 0's
    assert records and all("score" in o for r in records for o in r["privileged"]["objects"])
    for r in records:
        boxes = [grid.Box(o["label"], tuple(o["bbox_px"])) for o in r["privileged"]["objects"]]
        assert r["meta"]["box_right"] == (grid.answer(queries[r["id"]]["type"], boxes) == r["answer"])


RESULTS = REPO / "examples" / "visual_privilege" / "results" / "boxes_lie"


def test_the_installed_boxes_lie_study_is_the_committed_study():
    """dopd_vl/assets/boxes_lie_study.json is the summary of the committed measurement."""
    payload = json.loads((RESULTS / "results.json").read_text())
    committed = json.loads((RESULTS / "boxes_lie_study.json").read_text())
    installed = json.loads((REPO / "dopd_vl" / "assets" / "boxes_lie_study.json").read_text())
    assert installed == committed == json.loads(json.dumps(boxes_lie.study_summary(payload)))
    assert len(payload["size"]["seeds"]) == 3 and payload["rates"] == list(boxes_lie.RATES)
    for cell in committed["cells"]:  # every method, every seed
        assert set(cell["heldout_accuracy"]) == {boxes_lie.toy.parse_method(m)[0] for m in boxes_lie.METHODS}
        assert all(len(v) == 3 for v in cell["heldout_accuracy"].values())


def test_diagnose_quotes_the_boxes_lie_study_for_scored_boxes():
    """For a dataset whose boxes carry detector scores, the reading quotes every measured noise rate
    and places the user's teacher-with-minus-without-boxes gap among the measured ones."""
    import statistics

    from dopd_vl.eval.diagnose import measured_study
    from dopd_vl.eval.trust import boxes_reading

    study = measured_study("boxes_lie")
    answers = {"teacher_priv_accuracy": 0.9, "teacher_plain_accuracy": 0.7}
    text = "\n".join(boxes_reading(answers, study))
    for cell in study["cells"]:
        assert f"Detector noise rate {cell['rate']:g}:" in text
        gain = cell["gain_over_vanilla"]["dopd_edge"]
        assert f"dopd_edge {statistics.fmean(gain):+.3f}" in text
    assert "Your teacher with the boxes minus without them, on the sampled prompts: +0.200" in text
    assert study["answer"] in text and study["caveat"] in text
    assert boxes_reading(None, study)[-2:] == [f"- {study['answer']}", f"- {study['caveat']}"]
