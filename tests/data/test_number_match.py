"""The one number-matching function (dopd_vl/data/number_match.py), checked case by case."""

import pytest

from dopd_vl.data.number_match import find_numbers, parse_number, same_number


@pytest.mark.parametrize(
    "text,values,glued",
    [
        ("72Mb per hour", [72.0], [True]),
        ("costs $72 or 72%", [72.0, 72.0], [False, False]),
        ("1,000 and 1,2,3", [1000.0, 1.0, 2.0, 3.0], [False] * 4),
        ("72.0 is 72.", [72.0, 72.0], [False, False]),
        ("3.5kg", [3.5], [True]),
        ("10000*.2=$2000 and .25 * 100", [10000.0, 0.2, 2000.0, 0.25, 100.0], [False] * 5),
        ("x3 times", [3.0], [True]),
        ("a loss of -5 and 3-4", [-5.0, 3.0, 4.0], [False, False, False]),
        ("seventy-two apples", [72.0], [False]),
        ("one hundred and five", [105.0], [False]),
        ("Twelve eggs, two thousand ants", [12.0, 2000.0], [False, False]),
        ("hundreds of people", [], []),
        ("no numbers here", [], []),
    ],
)
def test_find_numbers_in_every_notation(text, values, glued):
    found = find_numbers(text)
    assert [n.value for n in found] == values and [n.glued for n in found] == glued
    for n in found:  # spans point at the number itself
        assert text[n.start : n.end].strip()


@pytest.mark.parametrize(
    "answer,value",
    [
        ("72", 72.0),
        ("$1,000", 1000.0),
        ("72.0", 72.0),
        ("18%", 18.0),
        ("twelve", 12.0),
        ("5.", 5.0),
        ("Paris", None),
        ("3 dogs", None),
        ("1 2", None),
    ],
)
def test_parse_number_accepts_one_number_in_any_notation(answer, value):
    assert parse_number(answer) == value


def test_same_number_ignores_sign_and_float_noise():
    assert same_number(72, 72.0) and same_number(-5, 5) and same_number(0.1 + 0.2, 0.3) and not same_number(72, 73)
