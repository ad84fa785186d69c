"""Answer matching for evaluation and the `accuracy` metric.

Normalised matching for the answer kinds the builders produce:
* numbers: the last number in the response (any notation of `dopd_vl.data.number_match`: digits, "1,000",
  "72.0", "$72", "72%", number words) is compared by value (GSM8K's convention: the final number
  is the answer);
* yes / no: the first "yes" or "no" word in the response;
* short labels: the normalised label (lower case, no punctuation or articles) as whole words.
"""

from __future__ import annotations

import re
import string

from dopd_vl.data.number_match import find_numbers, parse_number

__all__ = ["normalize_text", "extract_number", "extract_yes_no", "is_correct", "answer_kind"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_text(text: str) -> str:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def extract_number(text: str) -> float | None:
    matches = find_numbers(text)
    return matches[-1].value if matches else None


def extract_yes_no(text: str) -> str | None:
    m = re.search(r"\b(yes|no)\b", text.lower())
    return m.group(1) if m else None


def answer_kind(answer: str) -> str:
    if normalize_text(answer) in ("yes", "no"):
        return "yes_no"
    return "number" if parse_number(answer) is not None else "label"


def is_correct(response: str, answer: str | int | float) -> bool:
    answer = str(answer)
    kind = answer_kind(answer)
    if kind == "yes_no":
        return extract_yes_no(response) == normalize_text(answer)
    if kind == "number":
        value = extract_number(response)
        return value is not None and abs(value - parse_number(answer)) < 1e-6
    target = normalize_text(answer)
    return bool(target) and re.search(rf"(?<!\w){re.escape(target)}(?!\w)", normalize_text(response)) is not None
