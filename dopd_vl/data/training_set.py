"""The records a training run uses (docs/design.md §3.1): the recipe's data after the preflight
(`data.on_error: fail` stops before the first step, `skip` leaves the faulty records out), and a
picker that minds image files vanishing mid-run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dopd_vl.data.image_roots import ImageRoots, image_roots
from dopd_vl.data.images import image_parts
from dopd_vl.data.preflight import check_data
from dopd_vl.data.sources import load_records
from dopd_vl.errors import DatasetError

__all__ = ["preflight_records", "RecordPicker"]

logger = logging.getLogger(__name__)


def preflight_records(
    data,
    adapter,
    *,
    max_prompt_length: int = 0,
    privileged: bool = True,
    progress: bool = True,
    answer_needed_by: str | None = None,
) -> tuple[Any, list[dict]]:
    """The training records of a recipe's `data` section after the preflight, and the skipped ones
    ({id, where, field, kind, message, step 0}): under `on_error: fail` any fault is a DatasetError
    here, before the first step; under `skip` the faulty records are left out (logged).
    `answer_needed_by` (what reads verdicts, e.g. "objective.trust: verified"): a record without
    `answer` is a fault too, even with the preflight off."""
    if data.preflight == "off":
        records = load_records(data.train, split=data.split, columns=data.columns)
        return _with_answers(records, data, answer_needed_by, [])
    records, skipped = _preflight(data, adapter, max_prompt_length, privileged, progress)
    return _with_answers(records, data, answer_needed_by, skipped)


def _with_answers(records, data, needed_by: str | None, skipped: list[dict]) -> tuple[Any, list[dict]]:
    """Records without `answer` when something reads verdicts: a DatasetError naming them (fail) or
    left out and listed (skip)."""
    if needed_by is None:
        return records, skipped
    answerless = [i for i in range(len(records)) if records[i].get("answer") is None]
    if not answerless:
        return records, skipped
    ids = [str(records[i].get("id", i)) for i in answerless]
    shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
    message = f"{needed_by} needs an `answer` to verify, and {len(ids)} record(s) have none: {shown}"
    if data.on_error == "fail":
        raise DatasetError(message + " (data.on_error=skip trains on the rest)", file=str(data.train), field="answer")
    logger.warning("data.on_error=skip: %s; left out", message)
    skipped = skipped + [
        {"id": i, "where": str(data.train), "field": "answer", "kind": "answer_missing", "message": message, "step": 0}
        for i in ids
    ]
    keep = [i for i in range(len(records)) if records[i].get("answer") is not None]
    if not keep:
        raise DatasetError(f"{needed_by} needs an `answer`, and no record has one", file=str(data.train))
    return ([records[i] for i in keep] if isinstance(records, list) else records.subset(keep)), skipped


def _preflight(data, adapter, max_prompt_length: int, privileged: bool, progress: bool) -> tuple[Any, list[dict]]:
    valid, report, rows = check_data(
        data.train,
        adapter,
        split=data.split,
        columns=data.columns,
        mode=data.preflight,
        max_prompt_length=max_prompt_length,
        privileged=privileged,
        progress=progress,
        image_roots_extra=data.image_roots,
    )
    if report.faults and data.on_error == "fail":
        raise DatasetError(
            "the data preflight found faults (data.on_error=skip trains on the rest; `dopd check-data` lists every "
            "one):\n" + report.summary()
        )
    if report.faults:
        logger.warning(
            "data.on_error=skip: %d faulty record(s) left out before the first step:\n%s",
            len(report.bad_indices),
            report.summary(),
        )
    if not valid:
        raise DatasetError("no record of the dataset is usable", file=str(data.train))
    skipped = [
        {"id": f.record, "where": f.where, "field": f.field, "kind": f.kind, "message": f.message, "step": 0}
        for f in report.faults
    ]
    return ([rows[i] for i in valid] if isinstance(rows, list) else rows.subset(valid)), skipped


class RecordPicker:
    """Records for a step, minding files that vanish mid-run: under `fail` a missing image is a
    DatasetError naming it; under `skip` the next record whose images are all there takes its place
    (deterministic, so a resumed run replaces the same way and batch sizes hold)."""

    def __init__(self, records, root: ImageRoots | Path | None, source: str, on_error: str):
        self.records, self.root, self.source, self.on_error = records, image_roots(root), source, on_error
        self.vanished: set[int] = set()

    def pick(self, index: int, step: int) -> tuple[dict, list[dict]]:
        """(the record to use for position `index`, the records skipped on the way)."""
        skipped = []
        for offset in range(len(self.records)):
            i = (index + offset) % len(self.records)
            if i in self.vanished:
                continue
            record = self.records[i]
            paths = [self.root.resolve(ref, record["id"]) for ref in image_parts(record) if isinstance(ref, str)]
            missing = next((p for p in paths if not p.is_file()), None)
            if missing is None:
                return record, skipped
            if self.on_error == "fail":
                raise DatasetError(
                    f"image not found: {missing} (it was there when the run started)",
                    file=self.source,
                    record=record["id"],
                    field="prompt.image",
                )
            logger.warning(
                "step %d: record %s: image %s vanished; data.on_error=skip uses the next record",
                step,
                record["id"],
                missing,
            )
            self.vanished.add(i)
            skipped.append(
                {
                    "id": record["id"],
                    "where": self.source,
                    "field": "prompt.image",
                    "kind": "image_missing",
                    "message": f"image not found: {missing} (vanished mid-run)",
                    "step": step,
                }
            )
        raise DatasetError("every record's images have vanished", file=self.source)
