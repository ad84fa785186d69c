"""Answer matching for evaluation and the `accuracy` metric.

Normalised matching for the answer kinds the builders produce:
* numbers: the last number in the response (digits, "1,000", or a number word up to twenty) is
  compared by value (GSM8K's convention: the final number is the answer);
* yes / no: the first "yes" or "no" word in the response;
* short labels: the normalised label (lower case, no punctuation or articles) as whole words.
"""

from __future__ import annotations

import re
import string

__all__ = ["normalize_text", "extract_number", "extract_yes_no", "is_correct", "answer_kind"]

_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
          "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|\b(?:" + "|".join(_WORDS) + r")\b", re.IGNORECASE)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_text(text: str) -> str:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def _to_float(token: str) -> float | None:
    token = token.lower()
    if token in _WORDS:
        return float(_WORDS.index(token))
    try:
        return float(token.replace(",", ""))
    except ValueError:
        return None


def extract_number(text: str) -> float | None:
    matches = _NUMBER.findall(text)
    return _to_float(matches[-1]) if matches else None


def extract_yes_no(text: str) -> str | None:
    m = re.search(r"\b(yes|no)\b", text.lower())
    return m.group(1) if m else None


def answer_kind(answer: str) -> str:
    if normalize_text(answer) in ("yes", "no"):
        return "yes_no"
    return "number" if _to_float(answer.strip().rstrip(".")) is not None else "label"


def is_correct(response: str, answer: str | int | float) -> bool:
    answer = str(answer)
    kind = answer_kind(answer)
    if kind == "yes_no":
        return extract_yes_no(response) == normalize_text(answer)
    if kind == "number":
        value = extract_number(response)
        return value is not None and abs(value - _to_float(answer.strip().rstrip("."))) < 1e-6
    target = normalize_text(answer)
    return bool(target) and re.search(rf"(?<!\w){re.escape(target)}(?!\w)", normalize_text(response)) is not None
