"""The privileged teacher's verdicts, once per run (docs/design.md §1.12).

The teacher is frozen, so its greedy answer to a record, given the privileged context, is checked
once before the first step: output_dir/teacher_verdicts.jsonl holds one line per training record
({id, type, answer, response, verdict}), reused on resume; `data.teacher_verdicts: PATH` reads
precomputed ones (`dopd verify-teacher` writes them). `objective.trust: verified` and
`data.teacher_filter: verified` read them.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

from dopd_vl.data.answers import answer_kind
from dopd_vl.data.schema import record_id
from dopd_vl.data.verify import Verifier, verdict
from dopd_vl.errors import DatasetError
from dopd_vl.files import atomic_write_text
from dopd_vl.progress import progress_bar
from dopd_vl.training.rollout import RolloutConfig, sample_responses

__all__ = [
    "VERDICTS_FILE",
    "teacher_answers",
    "teacher_verdict_rows",
    "read_teacher_verdicts",
    "write_teacher_verdicts",
    "verdict_report",
    "report_line",
    "question_type",
]

logger = logging.getLogger(__name__)

VERDICTS_FILE = "teacher_verdicts.jsonl"


def teacher_answers(
    teacher, adapter, records, eos_token_ids, suppress_token_ids, max_new_tokens: int, batch_size: int = 8, engine=None
) -> list[str]:
    """The teacher's greedy answers on the privileged view (`teacher_priv`), one per record:
    Hugging Face `generate` (temperature 0), or a vLLM `engine` on the teacher's folder."""
    rollout = RolloutConfig(num_generations=1, max_new_tokens=max_new_tokens, temperature=0.0)
    answers = []
    starts = range(0, len(records), batch_size)
    for start in progress_bar(starts, desc="teacher verdicts", leave=False, disable=len(starts) <= 1):
        batch = [records[i] for i in range(start, min(start + batch_size, len(records)))]
        if engine is not None:
            out = engine.sample(None, adapter, batch, rollout, view="teacher_priv")
        else:
            out = sample_responses(
                teacher, adapter, batch, rollout, eos_token_ids, suppress_token_ids, view="teacher_priv"
            )
        answers += [adapter.tokenizer.decode(r, skip_special_tokens=True).strip() for r in out.responses]
    return answers


def question_type(record: dict) -> str:
    """`meta.question_type`, else the answer's kind (number, yes_no, label), else `none`."""
    qtype = (record.get("meta") or {}).get("question_type")
    if qtype:
        return str(qtype)
    return answer_kind(str(record["answer"])) if record.get("answer") is not None else "none"


def teacher_verdict_rows(records, answers: list[str], verifier: Verifier) -> list[dict]:
    """One row per record: {id, type, answer, response, verdict} (verdict None without `answer`)."""
    rows = []
    for i, response in enumerate(answers):
        record = records[i]
        rows.append(
            {
                "id": record_id(record, i),
                "type": question_type(record),
                "answer": record.get("answer"),
                "response": response,
                "verdict": verdict(verifier, response, record),
            }
        )
    return rows


def write_teacher_verdicts(path: Path, rows: list[dict]) -> None:
    """All rows at once (a temporary file renamed into place: never a half-written file)."""
    atomic_write_text(Path(path), "".join(json.dumps(r) + "\n" for r in rows))


def read_teacher_verdicts(path: str | Path, records) -> dict[str, bool | None]:
    """record id -> the teacher's verdict, from a teacher_verdicts.jsonl, for every training record.

    Raises:
        DatasetError: the file is missing or malformed (file, line, field), or lacks a record.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError("teacher verdicts file not found (`dopd verify-teacher RECIPE` writes one)", file=str(path))
    by_id: dict[str, bool | None] = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(f"invalid JSON: {err}", file=str(path), record=f"line {line_no}") from None
        if not isinstance(row, dict) or "id" not in row or row.get("verdict") not in (True, False, None):
            raise DatasetError(
                "each line needs an `id` and a `verdict` (true, false or null)",
                file=str(path),
                record=f"line {line_no}",
                field="verdict",
            )
        by_id[str(row["id"])] = row["verdict"]
    missing = [record_id(records[i], i) for i in range(len(records)) if record_id(records[i], i) not in by_id]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DatasetError(
            f"no teacher verdict for {len(missing)} training record(s): {shown}; recompute them with "
            "`dopd verify-teacher RECIPE`",
            file=str(path),
            field="id",
        )
    return by_id


def verdict_report(rows: list[dict]) -> dict:
    """The teacher's accuracy over records with a verdict, overall and per question type."""
    per_type: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        if row["verdict"] is not None:
            per_type[row["type"]].append(bool(row["verdict"]))
    n = sum(len(v) for v in per_type.values())
    return {
        "accuracy": sum(sum(v) for v in per_type.values()) / n if n else None,
        "count": n,
        "without_answer": sum(row["verdict"] is None for row in rows),
        "per_type": {t: {"accuracy": sum(v) / len(v), "count": len(v)} for t, v in sorted(per_type.items())},
    }


def report_line(report: dict) -> str:
    """One line: the teacher's accuracy overall and per type."""
    if report["accuracy"] is None:
        return "no record carries an answer: no teacher verdicts"
    per_type = ", ".join(f"{t} {v['accuracy']:.3f}" for t, v in report["per_type"].items())
    return f"privileged teacher accuracy {report['accuracy']:.3f} over {report['count']} records ({per_type})"
