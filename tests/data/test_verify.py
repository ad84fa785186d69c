"""The verifiers (docs/design.md §1.12): built-ins on hand-checked cases, the registry, `module:function`
in a recipe reaching the step's metrics, and the one-line errors."""

import pytest

from dopd_vl import VERIFIERS, ConfigError, get_verifier, register_verifier
from dopd_vl.data.verify import box_iou, parse_box, verdict


def check(name: str, response: str, answer, **record) -> bool | None:
    return verdict(get_verifier(name), response, {"id": "r0", "answer": answer, **record})


def test_auto_number_and_exact():
    assert check("auto", "so the total is $1,000.", "1000") is True
    assert check("auto", "Yes, it is.", "yes") is True and check("auto", "no", "yes") is False
    assert check("number", "first 3 then 72.0", "72") is True
    assert check("number", "72 then 3", "72") is False  # the last number is the answer
    assert check("number", "no number", "72") is False
    assert check("exact", "The Red Car.", "red car") is True  # articles and punctuation normalised
    assert check("exact", "a red car parked", "red car") is False
    assert check("auto", "anything", None) is None  # no answer: no verdict


def test_choice_by_letter_or_option_text():
    meta = {"meta": {"choices": ["a cat", "a dog", "a bird"]}}
    assert check("choice", "(B) a dog", "B", **meta) is True
    assert check("choice", "The answer is B.", "a dog", **meta) is True  # answer given as the option's text
    assert check("choice", "I would say C", "B", **meta) is False  # 'I' is no option of three; C is picked
    assert check("choice", "it is a bird", "C", **meta) is True  # no letter: the one option named
    assert check("choice", "a cat or a dog", "A", **meta) is False  # two options named: no pick
    assert check("choice", "A", "a", **meta) is True


def test_box_at_iou_half():
    assert parse_box('{"bbox_2d": [10, 20, 110, 220], "label": "cat"}') == [10.0, 20.0, 110.0, 220.0]
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    answer = '[{"bbox_2d": [100, 100, 300, 300], "label": "dog"}]'
    assert check("box", 'the dog: {"bbox_2d": [110, 100, 310, 300]}', answer) is True  # IoU 0.82
    assert check("box", "[200, 200, 400, 400]", answer) is False  # IoU 1/7
    assert check("box", "no box here", answer) is False


def test_register_and_module_function():
    def always(response, record):
        return True

    register_verifier("always_right_for_test", always)
    try:
        assert check("always_right_for_test", "x", "y") is True
        with pytest.raises(ValueError, match="already exists"):
            register_verifier("always_right_for_test", lambda r, rec: False)
        with pytest.raises(ValueError, match="built-in"):
            register_verifier("auto", always)
    finally:
        VERIFIERS.pop("always_right_for_test")
    assert check("helpers.verifiers:even_ids", "x", "y") is True


def test_unknown_verifier_is_one_line():
    with pytest.raises(ConfigError) as err:
        get_verifier("magic")
    assert "data.verifier" in str(err.value) and "auto, number, exact, choice, box" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="cannot import"):
        get_verifier("no_such_module_here:fn")
