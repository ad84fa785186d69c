"""The verified-routing study's cells and answer (examples/toy_privilege/verified.py) on hand-made
results, and the installed asset against the committed study summary."""

import json
import statistics
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))

from examples.toy_privilege import verified  # noqa: E402

LABELS = [m.split("=")[0] for m in verified.METHODS]


def _heldout(acc: float) -> dict:
    return {"accuracy": acc, "per_type": {"no_carry": acc, "carry": acc / 2}}


def _training(moved: float = 0.0) -> dict:
    return {"collapse_alarm_step": None, "first/trust/teacher_wrong": moved, "mean/trust/teacher_wrong": moved}


def _trust_payload(accuracy: dict[str, dict[str, list[float]]]) -> dict:
    prepared = {
        str(s): {
            "student_plain_heldout": {"accuracy": 0.7},
            "teacher_clean_priv_heldout": {"accuracy": 0.94},
            "teacher_blind_priv_heldout": {"accuracy": 0.5},
        }
        for s in range(3)
    }
    results = {
        teacher: {
            label: {str(s): {"heldout": _heldout(v), "training": _training(0.1)} for s, v in enumerate(values)}
            for label, values in per_label.items()
        }
        for teacher, per_label in accuracy.items()
    }
    chosen = {teacher: dict.fromkeys(per_label, 1e-4) for teacher, per_label in accuracy.items()}
    return {"prepared": prepared, "results": results, "selection": {"chosen": chosen}}


def test_cells_and_the_answer_by_hand(tmp_path):
    """Clean teacher: the filtered baseline is best on seeds 0 and 1, vanilla on seed 2; blind teacher:
    dopd_initial_verified keeps DOPD initial's win. Gains over the better baseline are per seed."""
    clean = {label: [0.80, 0.82, 0.84] for label in LABELS}
    clean["vanilla_filtered"] = [0.85, 0.83, 0.80]
    clean["dopd_initial_verified"] = [0.84, 0.83, 0.85]  # -0.01, 0, +0.01 over max(vanilla, filtered)
    clean["dopd_verified"] = [0.70, 0.70, 0.70]  # far below
    clean["dopd_initial"] = [0.78, 0.79, 0.80]  # -0.07, -0.04, -0.04: -0.050 ± 0.017, below by more than noise
    blind = {label: [0.40, 0.40, 0.40] for label in LABELS}
    blind["dopd_initial"] = [0.75, 0.78, 0.72]
    blind["dopd_initial_verified"] = [0.76, 0.77, 0.74]
    root = tmp_path / "verified"
    (root / "two_step" / "trust").mkdir(parents=True)
    payload = _trust_payload({"clean": clean, "blind": blind})
    (root / "two_step" / "trust" / "results.json").write_text(json.dumps(payload))
    measured = verified.cells(root)
    assert [c["name"] for c in measured] == ["two_step, clean teacher", "two_step, blind teacher"]
    gains = measured[0]["gain_over_best_baseline"]["dopd_initial_verified"]
    assert gains == pytest.approx([-0.01, 0.0, 0.01])
    assert measured[0]["subsets"]["carry"]["vanilla_opd"] == pytest.approx([0.40, 0.41, 0.42])
    assert measured[1]["first_step"]["dopd_initial_verified"] == {"trust/teacher_wrong": [0.1, 0.1, 0.1]}
    text, verdicts = verified.answer(measured)
    assert verdicts["dopd_initial_verified"]["never_below_best_baseline"] is True
    assert verdicts["dopd_initial_verified"]["keeps_blind_spot_win"] is True
    assert verdicts["dopd_verified"]["never_below_best_baseline"] is False
    assert verdicts["dopd_initial"]["never_below_best_baseline"] is False
    assert verdicts["dopd_initial"]["keeps_blind_spot_win"] is True
    assert text.startswith("Yes: dopd_initial_verified never fell below")
    table = verified.tables(root)
    assert "| two_step, clean teacher | dopd_initial_verified | 0.0001 | 0.840 ± 0.010 |" in table
    study = json.loads((root / "verified_study.json").read_text())
    assert study["answer"] == text and study["cells"] == json.loads(json.dumps(measured))


def test_the_installed_verified_study_is_the_committed_study():
    """dopd diagnose quotes dopd_vl/assets/verified_study.json: the study's own summary of its
    committed results, recomputed here from them."""
    results = REPO / "examples" / "toy_privilege" / "results" / "verified"
    committed = json.loads((results / "verified_study.json").read_text())
    installed = json.loads((REPO / "dopd_vl" / "assets" / "verified_study.json").read_text())
    assert installed == committed
    assert committed == json.loads(json.dumps(verified.study_summary(verified.cells(results))))


def test_diagnose_quotes_the_nearest_verified_cell():
    """`dopd diagnose`'s reading places the user's teacher accuracy among the measured teachers and
    quotes the nearest cell's gains over the better baseline and the study's answer."""
    from dopd_vl.eval.diagnose import measured_study
    from dopd_vl.eval.trust import verified_reading

    study = measured_study("verified")
    answers = {"teacher_priv_accuracy": 0.5, "student_accuracy": 0.7}
    text = "\n".join(verified_reading(answers, study))
    assert "Nearest measured cell by the teacher's accuracy: two_step, blind teacher" in text
    blind = next(c for c in study["cells"] if c["teacher"] == "blind")
    gain = blind["gain_over_best_baseline"]["dopd_initial_verified"]
    assert f"dopd_initial_verified {statistics.fmean(gain):+.3f}" in text
    assert study["answer"] in text and "inside that range" in text
