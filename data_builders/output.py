"""Writing builder outputs atomically, and the build report every builder returns."""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from dopd_vl.data import validate_record
from dopd_vl.errors import DatasetError

__all__ = ["BuildReport", "write_jsonl_atomic", "finish_build", "check_on_error"]


@dataclass
class BuildReport:
    records: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"id", "file", "reason"}
    counts: Counter = field(default_factory=Counter)  # e.g. questions per type, objects, leaks
    leaks: list[dict] = field(default_factory=list)  # hint builders: {"id", "hints": [indices], "answer"}

    def summary(self) -> str:
        extra = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        return f"{len(self.records)} records, {len(self.skipped)} skipped" + (f"; {extra}" if extra else "")


def check_on_error(on_error: str) -> None:
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")


def write_jsonl_atomic(path: str | Path, rows: list[dict]) -> None:
    """Write to a temporary file beside `path`, then rename: never a partial file at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def finish_build(report: BuildReport, out: str | Path) -> BuildReport:
    """Validate every record with the engine's schema, check ids, then write OUT (and OUT.skipped.jsonl)."""
    if not report.records:
        reasons = f" ({len(report.skipped)} skipped; first: {report.skipped[0]['reason']})" if report.skipped else ""
        raise DatasetError(f"the dataset is empty: no record was built{reasons}", file=str(out))
    seen: set[str] = set()
    for i, record in enumerate(report.records):
        validate_record(record, file=str(out), index=i)
        if record["id"] in seen:
            raise DatasetError("duplicate record id", file=str(out), record=record["id"], field="id")
        seen.add(record["id"])
    skipped_path = Path(f"{out}.skipped.jsonl")
    if report.skipped:
        write_jsonl_atomic(skipped_path, report.skipped)
    write_jsonl_atomic(out, report.records)
    return report
