"""The data preflight (`dopd check-data`, and `data.preflight` at the start of `dopd train`;
docs/design.md §3.1): every record checked before any GPU hour is spent on it.

Per record: the schema (and duplicate ids); each image exists, opens, is not a decompression bomb
(Pillow's `MAX_IMAGE_PIXELS`, reported rather than raised), and is complete (`quick`: the file ends
with its format's end marker, PNG's IEND or JPEG's EOI; `full`: a full decode); the boxes of a
grounding record and the crops of its context lie inside the image; the privileged views render
through the real processor; the longest view's prompt, image tokens included, fits
`rollout.max_prompt_length` (prompts are never truncated: a cut could split an image's tokens).
Images are checked in parallel threads. A `DataReport` counts faults per kind and keeps each with
its place (file:line or dataset row), record id and field; its valid records are what training uses
under `data.on_error: skip`.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from dopd_vl.data.image_roots import ImageRoots, image_roots
from dopd_vl.data.images import image_parts
from dopd_vl.data.schema import record_id, validate_record
from dopd_vl.data.sources import DatasetRecords, json_lines, records_root
from dopd_vl.errors import DatasetError, ImageOutsideRoots
from dopd_vl.progress import progress_bar

__all__ = ["FAULT_KINDS", "Fault", "DataReport", "check_data", "check_image"]

logger = logging.getLogger(__name__)

FAULT_KINDS = (
    "invalid_json",
    "schema",
    "duplicate_id",
    "image_missing",
    "image_outside_roots",
    "image_unreadable",
    "image_truncated",
    "image_too_large",
    "box_outside_image",
    "context_unrenderable",
    "prompt_too_long",
)
_END_MARKERS = {"PNG": b"IEND\xaeB`\x82", "JPEG": b"\xff\xd9"}


@dataclass
class Fault:
    kind: str
    where: str  # file:line, or "dataset row N"
    record: str
    field: str
    message: str
    index: int | None = None  # the record's position among the source's rows / lines


@dataclass
class DataReport:
    source: str
    mode: str
    records: int = 0
    faults: list[Fault] = field(default_factory=list)
    prompt_tokens_max: int = 0
    prompt_tokens_mean: float = 0.0
    max_prompt_length: int = 0

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(f.kind for f in self.faults))

    @property
    def bad_indices(self) -> set[int]:
        return {f.index for f in self.faults if f.index is not None}

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "mode": self.mode,
            "records": self.records,
            "faulty_records": len(self.bad_indices),
            "counts": self.counts,
            "prompt_tokens": {
                "max": self.prompt_tokens_max,
                "mean": self.prompt_tokens_mean,
                "limit": self.max_prompt_length or None,
            },
            "faults": [asdict(f) for f in self.faults],
        }

    def summary(self, examples: int = 5, report: str | Path | None = None) -> str:
        """Counts per kind and the faults, one line each. Every fault is printed unless more than
        `examples` + 5 would be (then the first `examples`, and where the full list is: `report`)."""
        if not self.faults:
            return (
                f"{self.source}: {self.records} records, no faults ({self.mode} check); longest prompt "
                f"{self.prompt_tokens_max} tokens"
            )
        counts = ", ".join(f"{kind} {n}" for kind, n in sorted(self.counts.items()))
        lines = [
            f"{self.source}: {len(self.bad_indices)} of {self.records} records have faults ({self.mode} check): "
            f"{counts}"
        ]
        shown = self.faults if len(self.faults) <= examples + 5 else self.faults[:examples]
        lines += [f"  {f.where}: {_fault_subject(f)}: {f.kind}: {f.message}" for f in shown]
        if len(shown) < len(self.faults):
            where = f"in {report}" if report is not None else "in the JSON report"
            lines.append(f"  ... and {len(self.faults) - len(shown)} more: every fault is listed {where}")
        return "\n".join(lines)


def _fault_subject(fault: Fault) -> str:
    """`record ID, field F`, or `record ID` where no field applies (a line that is not JSON)."""
    return f"record {fault.record}, field {fault.field}" if fault.field else f"record {fault.record}"


def check_image(
    ref: Any, root: ImageRoots | Path | None, mode: str = "quick"
) -> tuple[str, str] | tuple[None, tuple[int, int]]:
    """(fault kind, message), or (None, (width, height)) for a sound image. `ref` is a path (confined
    to `root`, see `dopd_vl.data.image_roots`) or an embedded {bytes, path}; nothing is raised."""
    import io

    from PIL import Image

    if isinstance(ref, dict) and ref.get("bytes") is not None:
        data, label = ref["bytes"], "embedded image"
        opener, tail = (lambda: io.BytesIO(data)), data[-16:]
    else:
        try:
            path = image_roots(root).resolve(ref["path"] if isinstance(ref, dict) else ref, "?")
        except ImageOutsideRoots as err:
            return "image_outside_roots", str(err).split(": ", 1)[-1]
        except DatasetError as err:
            return "image_missing", str(err).split(": ", 1)[-1]
        if not path.is_file():
            return "image_missing", f"image not found: {path}"
        label = str(path)
        opener = lambda: path  # noqa: E731 - PIL opens a path itself
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 16))
            tail = f.read()
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # over the limit: a fault, not a warning
        try:
            with Image.open(opener()) as img:
                size, fmt = img.size, img.format
                if mode == "full":
                    img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            return "image_too_large", f"{label}: {err}"
        except OSError as err:
            kind = "image_truncated" if "truncated" in str(err) or "broken" in str(err) else "image_unreadable"
            return kind, f"{label}: {err}"
        except (SyntaxError, ValueError) as err:
            return "image_unreadable", f"{label}: {err}"
    if mode == "quick" and fmt in _END_MARKERS and _END_MARKERS[fmt] not in tail:
        return "image_truncated", f"{label}: the {fmt} file does not end with its end marker (cut short)"
    return None, size


def check_data(
    source: str | Path,
    adapter,
    *,
    split: str = "train",
    columns: dict | None = None,
    mode: str = "quick",
    max_prompt_length: int = 0,
    privileged: bool = True,
    workers: int = 8,
    progress: bool = True,
    image_roots_extra: list | tuple = (),
) -> tuple[list[int], DataReport, Any]:
    """Check every record of `source` (see the module docstring) with the student's `adapter`;
    `image_roots_extra` is the recipe's `data.image_roots`.

    Returns (valid record positions, report, rows): `rows` is the list of records (JSONL) or the
    unvalidated `DatasetRecords`; a record with any fault is not among the valid ones."""
    if mode not in ("quick", "full"):
        raise ValueError(f"preflight mode must be quick or full, got {mode!r}")
    report = DataReport(str(source), mode, max_prompt_length=max_prompt_length)
    root = image_roots(records_root(source), image_roots_extra)
    rows, records, places = _read(source, split, columns, report)
    report.records = len(rows)

    # Images first, in threads (file I/O and decoding release the GIL); sizes feed the box check.
    refs = {(i, k): ref for i, record in records.items() for k, ref in enumerate(image_parts(record))}
    sizes: dict[tuple[int, int], tuple[int, int]] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda item: (item[0], check_image(item[1], root, mode)), refs.items())
        for (i, k), (kind, detail) in progress_bar(
            results, total=len(refs), desc="images", disable=not progress or not refs, leave=False
        ):
            if kind is None:
                sizes[(i, k)] = detail
            else:
                _add(report, records[i], i, places, kind, f"prompt.image[{k}]", detail)

    # The longest view (the privileged one when the objective reads it) rendered as training will.
    view = "student_priv" if privileged else "student"
    lengths, pending = [], []
    for i, record in progress_bar(records.items(), desc="records", disable=not progress, leave=False):
        n_images = len(list(image_parts(record)))
        if any((i, k) not in sizes for k in range(n_images)):
            continue  # its image is already a fault; rendering would only repeat it
        record_sizes = [sizes[(i, k)] for k in range(n_images)]
        _check_boxes(report, record, i, places, record_sizes)
        if privileged and record.get("privileged_context") is None:
            _add(
                report,
                record,
                i,
                places,
                "context_unrenderable",
                "privileged_context",
                "the record has no privileged context for the privileged views",
            )
            continue
        try:
            rendered = _rendered(adapter, record, view, record_sizes, mode)
        except DatasetError as err:
            _add(
                report,
                record,
                i,
                places,
                "context_unrenderable" if view != "student" else "schema",
                err.field or "privileged_context",
                str(err).split(": ", 1)[-1],
            )
            continue
        pending.append((i, record, rendered))
    for start in range(0, len(pending), 1024):
        batch = pending[start : start + 1024]
        texts = [r for _, _, r in batch if isinstance(r, str)]
        counted = (
            iter(len(ids) for ids in adapter.tokenizer(texts, add_special_tokens=False)["input_ids"])
            if texts
            else iter(())
        )
        for i, record, rendered in batch:
            n = next(counted) if isinstance(rendered, str) else rendered
            lengths.append(n)
            if max_prompt_length and n > max_prompt_length:
                _add(
                    report,
                    record,
                    i,
                    places,
                    "prompt_too_long",
                    "prompt",
                    f"{view} prompt is {n} tokens, over rollout.max_prompt_length {max_prompt_length}",
                )
    report.prompt_tokens_max = max(lengths, default=0)
    report.prompt_tokens_mean = round(sum(lengths) / len(lengths), 1) if lengths else 0.0
    report.faults.sort(key=lambda f: (f.index if f.index is not None else -1, FAULT_KINDS.index(f.kind)))
    valid = [i for i in range(len(rows)) if i not in report.bad_indices]
    return valid, report, rows


@runtime_checkable
class RendersText(Protocol):
    """A text adapter: its prompt is rendered chat text, tokenised by the preflight many at once."""

    def prompt_text(self, record: dict, view: str) -> str: ...


@runtime_checkable
class CountsPromptTokens(Protocol):
    """A vision adapter that counts a prompt's tokens from the image sizes, without decoding them."""

    def prompt_length(self, record: dict, view: str, image_sizes: list[tuple[int, int]]) -> int | None: ...


def _rendered(adapter, record: dict, view: str, image_sizes: list[tuple[int, int]], mode: str) -> str | int:
    """The view's rendered text (text adapters: tokenised in batches by the caller) or its length.
    `quick` counts a vision prompt's tokens from the image sizes without decoding them; `full`
    renders it through the processor, images decoded, as training does."""
    if isinstance(adapter, RendersText):
        return adapter.prompt_text(record, view)
    if mode == "quick" and isinstance(adapter, CountsPromptTokens):
        counted = adapter.prompt_length(record, view, image_sizes)
        if counted is not None:
            return counted
    return int(adapter.prompt(record, view).input_ids.numel())


def _read(source, split: str, columns: dict | None, report: DataReport) -> tuple[Any, dict[int, dict], dict[int, str]]:
    """(rows, {position: record that passed the schema}, {position: file:line or dataset row});
    schema faults go into the report."""
    path = Path(source)
    records: dict[int, dict] = {}
    places: dict[int, str] = {}
    seen: dict[str, str] = {}
    if path.suffix in (".jsonl", ".json") and not columns:
        if not path.is_file():
            raise DatasetError("file not found", file=str(path))
        rows: list = []
        for line_no, value in json_lines(path):
            where = places[len(rows)] = f"{path}:{line_no}"
            i = len(rows)
            rows.append(value if not isinstance(value, DatasetError) else None)
            if isinstance(value, DatasetError):
                message = str(value).removeprefix(f"file {where}, record line {line_no}: ")
                report.faults.append(Fault("invalid_json", where, f"line {line_no}", "", message, i))
                continue
            _schema(report, value, i, where, seen, records)
        return rows, records, places
    rows = DatasetRecords.unvalidated(source, split, columns or {})
    for i, record in rows.iter_records():
        where = places[i] = f"{source} row {i}"
        if isinstance(record, DatasetError):
            report.faults.append(
                Fault(
                    "schema", where, record.record or f"row-{i}", record.field or "", str(record).split(": ", 1)[-1], i
                )
            )
            continue
        _schema(report, record, i, where, seen, records)
    return rows, records, places


def _schema(
    report: DataReport, record: Any, i: int, where: str, seen: dict[str, str], records: dict[int, dict]
) -> None:
    try:
        validate_record(record, file=where, index=i)
    except DatasetError as err:
        report.faults.append(
            Fault("schema", where, record_id(record, i), err.field or "", str(err).split(": ", 1)[-1], i)
        )
        return
    if record["id"] in seen:
        report.faults.append(
            Fault("duplicate_id", where, record["id"], "id", f"duplicate id (first at {seen[record['id']]})", i)
        )
        return
    seen[record["id"]] = where
    records[i] = record


def _check_boxes(
    report: DataReport, record: dict, i: int, places: dict[int, str], sizes: list[tuple[int, int]]
) -> None:
    """Grounding objects' `bbox_px` inside the first image; context crops inside their image."""
    if not sizes:
        return
    privileged = record.get("privileged") or {}
    w, h = sizes[0]
    for k, obj in enumerate(privileged.get("objects") or []):
        box = obj.get("bbox_px") if isinstance(obj, dict) else None
        if isinstance(box, list) and len(box) == 4 and not _inside(box, w, h):
            _add(
                report,
                record,
                i,
                places,
                "box_outside_image",
                f"privileged.objects[{k}].bbox_px",
                f"box {box} lies outside the {w}x{h} image",
            )
    context = record.get("privileged_context")
    for k, part in enumerate(context if isinstance(context, list) else []):
        if part.get("type") == "image" and part.get("image_index", 0) < len(sizes):
            cw, ch = sizes[part.get("image_index", 0)]
            if not _inside(part["crop"], cw, ch):
                _add(
                    report,
                    record,
                    i,
                    places,
                    "box_outside_image",
                    f"privileged_context[{k}].crop",
                    f"crop {part['crop']} lies outside the {cw}x{ch} image",
                )


def _inside(box: list[float], w: int, h: int, slack: float = 0.5) -> bool:
    x1, y1, x2, y2 = box
    return -slack <= x1 < x2 <= w + slack and -slack <= y1 < y2 <= h + slack


def _add(
    report: DataReport, record: dict, i: int, places: dict[int, str], kind: str, field_name: str, message: str
) -> None:
    report.faults.append(Fault(kind, places[i], record_id(record, i), field_name, message, i))
