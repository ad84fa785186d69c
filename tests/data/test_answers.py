"""What a record's answer means (dopd_vl/data/answers.py): normalisation on hand-written cases."""

import pytest

from dopd_vl.data.answers import extract_number, extract_yes_no, is_correct, normalize_text


@pytest.mark.parametrize(
    "response,answer,expected",
    [
        ("3", "3", True),
        ("There are three red circles.", "3", True),
        ("I count 2, no wait, 4", "4", True),  # the last number is the answer (GSM8K convention)
        ("1,000 marbles", "1000", True),
        ("3.0", "3", True),
        ("4", "3", False),
        ("Yes, there is.", "yes", True),
        ("no", "yes", False),
        ("Yes? No.", "no", False),  # the first yes/no word counts
        ("The Blue Square.", "blue square", True),
        ("a blue squares", "blue square", False),
        ("", "3", False),
    ],
)
def test_answer_normalisation(response, answer, expected):
    assert is_correct(response, answer) is expected


def test_answer_normalisation_helpers():
    assert normalize_text("  The  Red, Circle! ") == "red circle"
    assert extract_number("twelve apples and 5 pears") == 5.0
    assert extract_number("none here") is None
    assert extract_yes_no("Well... NO.") == "no"
