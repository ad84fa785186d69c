"""Finding numbers in text, in every notation a worked solution or an answer uses.

One definition, used wherever a number must be recognised: the hint builder's masking and its
leak report (a hint must not reveal the final answer in any notation), and answer matching in
evaluation. Recognised: plain digits, thousands separators (`1,000`), decimals (`72.0` equals
`72`), numbers glued to units or signs (`72Mb`, `$72`, `72%`, `x3`), a leading minus, and number
words (`twelve`, `seventy-two`, `one hundred and five`, `3 thousand` is two numbers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["NumberMatch", "find_numbers", "parse_number", "same_number"]

_SMALL = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
_SCALES = {"hundred": 100, "thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000}
_WORD_VALUES = {**{w: i for i, w in enumerate(_SMALL)}, **_TENS}
_WORD = "|".join(sorted([*_WORD_VALUES, *_SCALES], key=len, reverse=True))
# A digit run: thousands groups only when every group has 3 digits ("1,2,3" is three numbers);
# never preceded by a digit or a decimal point, so "3.5" is one number; ".25" is 0.25.
_DIGITS = re.compile(r"(?<![\d.])(?:(?:\d{1,3}(?:,\d{3})+(?![\d])|\d+)(?:\.\d+)?|\.\d+)")
_WORDS = re.compile(rf"\b(?:{_WORD})(?:(?:[\s-]+(?:and[\s-]+)?)(?:{_WORD}))*\b", re.IGNORECASE)
_EPS = 1e-9


@dataclass(frozen=True)
class NumberMatch:
    start: int
    end: int
    value: float
    glued: bool  # digits touching a letter (a unit such as "72Mb" or "5kg")


def find_numbers(text: str) -> list[NumberMatch]:
    """Every number in `text`, in order of position (digit and word forms)."""
    found = []
    for m in _DIGITS.finditer(text):
        start, value = m.start(), float(m.group().replace(",", ""))
        if start > 0 and text[start - 1] == "-" and (start == 1 or not text[start - 2].isalnum()):
            start, value = start - 1, -value
        before = text[start - 1] if start > 0 else ""
        after = text[m.end()] if m.end() < len(text) else ""
        found.append(NumberMatch(start, m.end(), value, before.isalpha() or after.isalpha()))
    for m in _WORDS.finditer(text):
        value = _words_value(m.group())
        if value is not None:
            found.append(NumberMatch(m.start(), m.end(), float(value), False))
    return sorted(found, key=lambda n: n.start)


def parse_number(text: str) -> float | None:
    """The value of a string that is one number in any notation (e.g. an answer), else None."""
    stripped = text.strip().rstrip(".")
    numbers = find_numbers(stripped)
    if len(numbers) != 1:
        return None
    n = numbers[0]
    rest = (stripped[: n.start] + stripped[n.end :]).strip()
    return n.value if rest in ("", "$", "%", "€", "£") else None


def same_number(a: float, b: float) -> bool:
    """Equal in value, sign ignored: "-5" still shows the digits of 5 (leak checks are conservative)."""
    return abs(abs(a) - abs(b)) < _EPS


def _words_value(phrase: str) -> int | None:
    words = [w for w in re.split(r"[\s-]+", phrase.lower()) if w and w != "and"]
    if not words or words[0] in _SCALES:
        return None  # "hundred" alone is not a number here ("hundreds of ...")
    total = current = 0
    for word in words:
        if word in _WORD_VALUES:
            current += _WORD_VALUES[word]
        elif word == "hundred":
            current *= 100
        else:
            total += current * _SCALES[word]
            current = 0
    return total + current
