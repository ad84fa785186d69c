"""Verifiers (docs/design.md §1.12): is a decoded response's answer right for its record?

A verifier maps (response text, record) to a verdict: True (correct), False (wrong), or None when
the record carries no `answer`. Training reads verdicts in three places: the student's responses
each step (`verify/*` metrics, `objective.trust: verified`, `uni_opd`'s balancing and margin), the
privileged teacher's greedy answers once per run (teacher_verdicts.py) and the data filter
`data.teacher_filter: verified`. Built-ins:

* `auto`: `answers.is_correct` (numbers by value, yes / no, short labels as whole words);
* `number`: the last number of the response equals the answer's value;
* `exact`: the normalised response equals the normalised answer;
* `choice`: multiple choice; the answer is a letter or an option's text, the options (if any)
  are `meta.choices` in letter order; the response's first standalone capital letter, or the
  text of exactly one option, is its pick;
* `box`: a box answer in the grounding format (`[x1, y1, x2, y2]` or `{"bbox_2d": [...]}`), right
  at IoU >= 0.5 with the first box of the response.

Custom verifiers: `register_verifier(name, fn)` from Python, or `module:function` in a recipe.
"""

from __future__ import annotations

import importlib
import json
import re
import string
from collections.abc import Callable

from dopd_vl.data.answers import extract_number, is_correct, normalize_text
from dopd_vl.data.number_match import parse_number
from dopd_vl.errors import ConfigError

__all__ = [
    "Verifier",
    "VERIFIERS",
    "register_verifier",
    "get_verifier",
    "verdict",
    "verdict_code",
    "BOX_IOU",
]

Verifier = Callable[[str, dict], bool | None]
"""(decoded response, record) -> True / False, or None when the record has no answer."""
BOX_IOU = 0.5
"""The `box` verifier's IoU threshold (the detection convention, AP50)."""

_LETTER = re.compile(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])")
_BOX = re.compile(
    r"\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\]"
)


def _auto(response: str, record: dict) -> bool:
    return is_correct(response, record["answer"])


def _number(response: str, record: dict) -> bool:
    value, target = extract_number(response), parse_number(str(record["answer"]))
    return value is not None and target is not None and abs(value - target) < 1e-6


def _exact(response: str, record: dict) -> bool:
    return normalize_text(response) == normalize_text(str(record["answer"]))


def _choice(response: str, record: dict) -> bool:
    choices = [str(c) for c in (record.get("meta") or {}).get("choices") or []]
    letters = string.ascii_uppercase[: len(choices)] if choices else string.ascii_uppercase
    answer = str(record["answer"]).strip()
    if len(answer) == 1 and answer.upper() in letters:
        target = answer.upper()
    else:  # the answer is an option's text: its letter
        matches = [letters[i] for i, c in enumerate(choices) if normalize_text(c) == normalize_text(answer)]
        if not matches:  # no options to map it to: the text itself, as whole words
            return is_correct(response, answer)
        target = matches[0]
    letter = next((m.group(1) for m in _LETTER.finditer(response) if m.group(1) in letters), None)
    if letter is None:  # no letter: the one option whose text the response contains
        text = f" {normalize_text(response)} "
        hits = [letters[i] for i, c in enumerate(choices) if f" {normalize_text(c)} " in text]
        letter = hits[0] if len(hits) == 1 else None
    return letter == target


def parse_box(text: str) -> list[float] | None:
    """The first [x1, y1, x2, y2] of a text (a grounding answer or a JSON object with bbox_2d)."""
    try:
        value = json.loads(text)
        if isinstance(value, dict) and "bbox_2d" in value:
            text = json.dumps(value["bbox_2d"])
        elif isinstance(value, list) and value and isinstance(value[0], dict) and "bbox_2d" in value[0]:
            text = json.dumps(value[0]["bbox_2d"])
    except (ValueError, TypeError):
        pass
    match = _BOX.search(text)
    return [float(v) for v in match.groups()] if match else None


def box_iou(a: list[float], b: list[float]) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes (0 for empty ones)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1]) + max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _box(response: str, record: dict) -> bool:
    target, given = parse_box(str(record["answer"])), parse_box(response)
    return target is not None and given is not None and box_iou(given, target) >= BOX_IOU


VERIFIERS: dict[str, Verifier] = {"auto": _auto, "number": _number, "exact": _exact, "choice": _choice, "box": _box}
"""The built-in verifiers and those registered with `register_verifier`."""
_BUILT_IN = tuple(VERIFIERS)


def register_verifier(name: str, verifier: Verifier, *, overwrite: bool = False) -> None:
    """Make `data.verifier: NAME` check answers with `verifier(response, record)`.

    Args:
        name: the verifier's name in recipes; not a built-in's and without ":".
        verifier: (decoded response, record) -> bool; it is called only for records with an
            `answer` (a None it returns counts as no verdict).
        overwrite: replace a different verifier registered under the same name.

    Raises:
        ValueError: the name is a built-in's, holds ":", or is taken.
    """
    if name in _BUILT_IN or ":" in name:
        raise ValueError(f"{name!r} cannot be registered: the built-in verifiers are {', '.join(_BUILT_IN)}")
    if name in VERIFIERS and not overwrite and VERIFIERS[name] is not verifier:
        raise ValueError(f"a verifier named {name!r} already exists; pass overwrite=True to replace it")
    VERIFIERS[name] = verifier


def get_verifier(spec: str) -> Verifier:
    """The verifier of `data.verifier`: a registered name or `package.module:function`.

    Raises:
        ConfigError: an unknown name, or a function that cannot be imported, in one line.
    """
    if spec in VERIFIERS:
        return VERIFIERS[spec]
    if ":" in spec:
        module, _, attr = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError) as err:
            raise ConfigError(f"data.verifier {spec!r}: cannot import the function: {err}") from None
        if not callable(fn):
            raise ConfigError(f"data.verifier {spec!r}: {attr} is not a function")
        return fn
    raise ConfigError(f"data.verifier: unknown verifier {spec!r}; choices: {', '.join(VERIFIERS)}, or module:function")


def verdict(verifier: Verifier, response: str, record: dict) -> bool | None:
    """The verifier's verdict on a response to a record; None when the record has no answer."""
    if record.get("answer") is None:
        return None
    result = verifier(response, record)
    return None if result is None else bool(result)


def verdict_code(value: bool | None) -> int:
    """A verdict as the plan's tensors hold it: 1 correct, 0 wrong, -1 none."""
    return -1 if value is None else int(value)
