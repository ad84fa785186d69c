"""The record schema (DESIGN.md 3.1): one validator used by the engine and by every builder.

A record:
    id                  non-empty string, unique in its dataset
    prompt              chat messages; content is a string or a list of parts
                        {"type": "text", "text": ...} / {"type": "image", "image": path}
    privileged_context  the rendered privileged text p (required by the privileged views only)
    privileged          structured source of p (provenance, diagnostics, leak checks), optional
    answer              reference for evaluation only, optional
    meta                free-form dict, optional
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from dopd_vl.errors import DatasetError

__all__ = ["RECORD_FIELDS", "validate_record", "load_records", "image_parts", "resolve_image_path", "record_id"]

RECORD_FIELDS = ("id", "prompt", "privileged_context", "privileged", "answer", "meta")
_ROLES = ("system", "user", "assistant")


def record_id(record: Any, index: int | None = None) -> str:
    """The record's id if it has a usable one, else its position (for error messages)."""
    if isinstance(record, dict) and isinstance(record.get("id"), str) and record["id"]:
        return record["id"]
    return f"#{index}" if index is not None else "?"


def validate_record(record: Any, *, file: str | None = None, index: int | None = None) -> None:
    """Raise DatasetError naming file, record and field for the first schema violation."""
    rid = record_id(record, index)

    def fail(field: str, message: str) -> None:
        raise DatasetError(message, file=file, record=rid, field=field)

    if not isinstance(record, dict):
        fail("<record>", f"a record must be a JSON object, got {type(record).__name__}")
    unknown = set(record) - set(RECORD_FIELDS)
    if unknown:
        fail(sorted(unknown)[0], f"unknown field(s) {sorted(unknown)}; valid fields: {list(RECORD_FIELDS)}")
    if not isinstance(record.get("id"), str) or not record["id"]:
        fail("id", "missing or empty id (a non-empty string)")
    prompt = record.get("prompt")
    if not isinstance(prompt, list) or not prompt:
        fail("prompt", "prompt must be a non-empty list of chat messages")
    for m, message in enumerate(prompt):
        where = f"prompt[{m}]"
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            fail(f"{where}.role", f"each message needs a role in {_ROLES}")
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list) or not content:
            fail(f"{where}.content", "content must be a string or a non-empty list of parts")
        for p, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                continue
            if kind == "image" and isinstance(part.get("image"), str) and part["image"]:
                continue
            fail(f"{where}.content[{p}]", 'each part must be {"type": "text", "text": str} or {"type": "image", "image": path}')
    if not any(m["role"] == "user" for m in prompt):
        fail("prompt", "prompt has no user message")
    if prompt[-1]["role"] != "user":
        fail("prompt", "the last message must be the user's (the response is the assistant's turn)")
    for field, kinds in (("privileged_context", (str,)), ("privileged", (dict,)), ("answer", (str, int, float)), ("meta", (dict,))):
        if record.get(field) is not None and not isinstance(record[field], kinds):
            fail(field, f"{field} must be of type {'/'.join(k.__name__ for k in kinds)}, got {type(record[field]).__name__}")


def load_records(path: str | Path) -> list[dict]:
    """Read and validate a JSONL dataset; errors name the file, line / record and field."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError("file not found", file=str(path))
    records, seen = [], {}
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"invalid JSON: {err.msg}", file=f"{path}:{line_no}", record=f"line {line_no}", field=f"column {err.colno}") from err
            validate_record(record, file=f"{path}:{line_no}", index=len(records))
            if record["id"] in seen:
                raise DatasetError(f"duplicate id (first on line {seen[record['id']]})", file=f"{path}:{line_no}", record=record["id"], field="id")
            seen[record["id"]] = line_no
            records.append(record)
    if not records:
        raise DatasetError("the dataset is empty", file=str(path))
    return records


def image_parts(record: dict) -> Iterable[str]:
    """Image paths of a record in prompt order (the order the processor sees them)."""
    for message in record["prompt"]:
        if isinstance(message["content"], list):
            for part in message["content"]:
                if part.get("type") == "image":
                    yield part["image"]


def resolve_image_path(root: str | Path | None, image: str, record: str) -> Path:
    """Relative paths are resolved against the dataset file's folder (DESIGN.md 3.1).

    They may point outside it (builders write paths relative to their output file, which need not
    sit above the images); confining annotation-supplied paths is the builders' job.
    """
    path = Path(image)
    if path.is_absolute():
        return path
    if root is None:
        raise DatasetError("relative image path but no dataset root to resolve it against", record=record, field="prompt.image")
    return (Path(root) / path).resolve()
