"""Privileged hint datasets from worked solutions (docs/design.md §3.2).

Inputs, one JSON object per line:
* GSM8K style: `question` + `answer` whose lines are the solution steps with `<<expr=result>>`
  calculator annotations and a final `#### N` line;
* generic: `question` + `solution` (a string of lines or a list; a `#### N` line or an `answer`
  field gives the final answer), or `question` + ready `hints`.

Styles, as compared in the paper [paper: step-wise hints without execution were best; the final
answer as privileged input hurts]:
* `steps` (default): one hint per solution step; annotations removed and every computed result
  (and the final answer) replaced by "?" wherever it appears; the final line dropped.
* `steps_exec`: the steps with their computations and results; the final line dropped.
* `summary`: one hint listing the operations in order, earlier results shown as "?".
* `final_answer`: one hint stating the final answer (for ablations; every record leaks by design,
  so it is refused unless asked for with `allow_leaking_style=True` / `--allow-leaking-style`).

A leak check reports every record whose hints contain the final answer, unless the question
itself contains it. Masking and the leak check recognise numbers with one function
(`dopd_vl.data.number_match.find_numbers`): digits glued to units (`72Mb`), currency, percentages,
thousands separators, decimals equal in value (`72.0`) and number words all count. A `HintGenerator` (e.g. a local
model) can write the hints instead; its
output goes through the same check.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Protocol, runtime_checkable

from data_builders.output import BuildReport, check_on_error, finish_build, portable_source
from data_builders.privileged import get_format
from dopd_vl.data.number_match import find_numbers, parse_number, same_number
from dopd_vl.data.sources import json_lines
from dopd_vl.errors import ConfigError, DatasetError

__all__ = [
    "STYLES",
    "STYLE_HELP",
    "LEAKING_STYLES",
    "HintGenerator",
    "parse_solution",
    "make_hints",
    "find_leaks",
    "build_hints",
]

STYLE_HELP = {
    "steps": "one hint per solution step, every computed result and the final answer shown as ? (default)",
    "steps_exec": "the solution steps with their computations and results, the final line dropped",
    "summary": "one hint listing the operations in order, earlier results shown as ?",
    "final_answer": "one hint stating the final answer: LEAKS the answer in every record (ablations only)",
}
"""What each hint style writes: the one text `--help`, the README and the docs quote."""
STYLES = tuple(STYLE_HELP)
LEAKING_STYLES = ("final_answer",)
"""Styles that put the final answer into the privileged context by design: built only when asked for."""
_ANNOTATION = re.compile(r"<<([^<>]*)>>")
GLUED_COUNT = "masked numbers glued to units"


@runtime_checkable
class HintGenerator(Protocol):
    """Writes hints for a question (e.g. a local transformers model). Output is leak-checked."""

    def generate(self, question: str, solution: str | None) -> list[str]: ...


def parse_solution(solution: str | list[str]) -> tuple[list[str], str | None, list[str]]:
    """(step lines, final answer or None, computed results from calculator annotations)."""
    lines = solution.splitlines() if isinstance(solution, str) else [str(s) for s in solution]
    steps, final = [], None
    for line in lines:
        if line.strip().startswith("####"):
            final = line.strip()[4:].strip()
            break
        if line.strip():
            steps.append(line.strip())
    results = [expr.rsplit("=", 1)[1] for line in steps for expr in _ANNOTATION.findall(line) if "=" in expr]
    return steps, final, results


def make_hints(
    steps: list[str], final: str | None, results: list[str], style: str, counts: Counter | None = None
) -> list[str]:
    """Hints of one solution in a style; see the module docstring. `counts` receives the number
    of masked numbers that were glued to units."""
    if style not in STYLES:
        raise ValueError(f"unknown hint style {style!r}; styles: {STYLES}")
    plain = [_ANNOTATION.sub("", s) for s in steps]
    if style == "steps_exec":
        return plain
    hidden = {parse_number(r) for r in results} | ({parse_number(final)} if final is not None else set())
    hidden.discard(None)
    counts = counts if counts is not None else Counter()
    if style == "steps":
        return [_hide_numbers(s, hidden, counts) for s in plain]
    if style == "summary":
        ops = [expr.rsplit("=", 1)[0] for s in steps for expr in _ANNOTATION.findall(s) if "=" in expr]
        if not ops:
            return [_hide_numbers(" ".join(plain), hidden, counts)]
        return ["Compute " + ", then ".join(_hide_numbers(op, hidden, counts) for op in ops) + "."]
    return [f"The final answer is {final}."]


def find_leaks(question: str, hints: list[str], final: str | None) -> list[int]:
    """Indices of hints that contain the final answer (none when the question contains it)."""
    if final is None or _contains(question, final):
        return []
    return [i for i, h in enumerate(hints) if _contains(h, final)]


def build_hints(
    input_path: str | Path,
    out: str | Path,
    *,
    style: str = "steps",
    privileged_format: str = "hints",
    generator: HintGenerator | None = None,
    on_error: str = "fail",
    embed_images: bool = False,
    allow_leaking_style: bool = False,
) -> BuildReport:
    """Records with hint privileged context for every input line, written atomically to `out`. A
    style in LEAKING_STYLES (the final answer as the hint) is refused unless `allow_leaking_style`."""
    check_on_error(on_error)
    if style not in STYLES:
        raise ValueError(f"unknown hint style {style!r}; styles: {STYLES}")
    if style in LEAKING_STYLES and not allow_leaking_style:
        raise ConfigError(
            f"hint style {style!r} puts the final answer into every record's privileged context (it leaks by "
            "design, for ablations): pass --allow-leaking-style (allow_leaking_style=True) to build it anyway"
        )
    fmt = get_format(privileged_format)
    path = Path(input_path)
    if not path.is_file():
        raise DatasetError("input file not found", file=str(path))
    report = BuildReport()
    for n, row in json_lines(path):
        where, rid = f"{path}:{n}", f"line {n}"
        try:
            if isinstance(row, DatasetError):
                raise row
            rid = str(row.get("id") or f"{path.stem}-{n:05d}") if isinstance(row, dict) else rid
            record, leaks = _record(
                row, rid, where, style, fmt, generator, report.counts, source=f"{portable_source(str(path), out)}:{n}"
            )
        except DatasetError as err:
            if on_error == "fail":
                raise
            report.skipped.append({"id": rid, "file": where, "reason": str(err)})
            continue
        report.records.append(record)
        report.counts["hints"] += len(record["privileged"]["hints"])
        if leaks:
            report.leaks.append({"id": rid, "hints": leaks, "answer": record.get("answer")})
    report.counts["leaks"] = len(report.leaks)
    return finish_build(report, out, embed_images)


def _record(
    row, rid: str, where: str, style: str, fmt, generator: HintGenerator | None, counts: Counter, source: str
) -> tuple[dict, list[int]]:
    if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not row["question"].strip():
        raise DatasetError("each line needs a non-empty string 'question'", file=where, record=rid, field="question")
    question = row["question"]
    solution = row.get(
        "solution", row.get("answer") if isinstance(row.get("answer"), str) and "####" in row["answer"] else None
    )
    final = None
    if solution is not None:
        if not isinstance(solution, (str, list)):
            raise DatasetError("solution must be a string of lines or a list", file=where, record=rid, field="solution")
        steps, final, results = parse_solution(solution)
        if not steps:
            raise DatasetError(
                "the solution has no step lines",
                file=where,
                record=rid,
                field="solution" if "solution" in row else "answer",
            )
    if (
        final is None
        and row.get("answer") is not None
        and not (isinstance(row["answer"], str) and "####" in row["answer"])
    ):
        final = str(row["answer"])
    if generator is not None:
        hints = [
            str(h)
            for h in generator.generate(
                question, solution if isinstance(solution, str) else None if solution is None else "\n".join(solution)
            )
        ]
        used_style = "generated"
    elif solution is not None:
        hints = make_hints(steps, final, results, style, counts)
        used_style = style
    elif isinstance(row.get("hints"), list) and row["hints"]:
        hints = [str(h) for h in row["hints"]]
        used_style = "given"
    else:
        raise DatasetError(
            "needs 'answer' with a '#### N' line, 'solution', or 'hints'", file=where, record=rid, field="answer"
        )
    if not hints or any(not h.strip() for h in hints):
        raise DatasetError("empty hint", file=where, record=rid, field="hints")
    privileged = {"format": fmt.name, "style": used_style, "hints": hints}
    record = {
        "id": rid,
        "prompt": [{"role": "user", "content": question}],
        "privileged_context": fmt.render(privileged),
        "privileged": privileged,
        "meta": {"source": source},  # the input line, relative to the output's folder
    }
    if final is not None:
        record["answer"] = final
    return record, find_leaks(question, hints, final)


def _hide_numbers(text: str, hidden: set[float], counts: Counter) -> str:
    """Replace every number whose value is hidden by "?", in any notation; units stay ("?Mb")."""
    out, end = [], 0
    for n in find_numbers(text):
        if n.start >= end and any(same_number(n.value, h) for h in hidden):
            out += [text[end : n.start], "?"]
            end = n.end
            counts[GLUED_COUNT] += n.glued
    return "".join(out) + text[end:]


def _contains(text: str, answer: str) -> bool:
    """Numeric answers match numbers of any notation by value; others as whole words."""
    value = parse_number(answer)
    if value is not None:
        return any(same_number(n.value, value) for n in find_numbers(text))
    return re.search(rf"(?<!\w){re.escape(answer.strip())}(?!\w)", text, flags=re.IGNORECASE) is not None
