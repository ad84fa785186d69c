"""Where records come from (docs/design.md §3.1), validated against the schema (schema.py).

Sources (`load_records`): a JSONL file, or any Hugging Face `datasets` source: a Parquet or
Arrow file, a `save_to_disk` folder, or a dataset id / local dataset folder for `load_dataset`
(offline, from the local cache). Columns may carry other names (`columns={"prompt": "question"}`);
a string prompt becomes one user turn. Datasets stay memory-mapped: rows become records when used.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from dopd_vl.data.schema import RECORD_FIELDS, validate_record
from dopd_vl.errors import DatasetError

__all__ = ["load_records", "records_root", "data_label", "DatasetRecords", "json_lines"]

_JSONL_SUFFIXES = (".jsonl", ".json")


def load_records(source: str | Path, *, split: str = "train", columns: dict[str, str] | None = None) -> Sequence[dict]:
    """Read and validate a dataset (see the module docstring); errors name the file, row / record
    and field. JSONL gives a list; a `datasets` source gives a memory-mapped `DatasetRecords`."""
    path = Path(source)
    if path.suffix in _JSONL_SUFFIXES and not columns:
        return _load_jsonl(path)
    return DatasetRecords(_open_dataset(source, split), columns or {}, str(source))


def data_label(source: str | Path) -> str:
    """A short file-name-safe name for a data source: a file's stem, a folder's name, a dataset id
    with `/` as `_` (`data/coco128.jsonl` -> `coco128`): what reports about the data are named for."""
    path = Path(str(source))
    if path.is_dir():
        name = path.name
    elif path.is_file() or path.suffix:
        name = path.stem
    else:  # a dataset id
        name = str(source).strip("/").replace("/", "_")
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "data"


def records_root(source: str | Path) -> Path | None:
    """The folder relative image paths resolve against, and the first allowed image root: a file's
    folder, a dataset folder itself; None for a hub id (its image paths must be absolute, inside
    `data.image_roots` or the trusted roots, or embedded)."""
    path = Path(source)
    if path.is_file():
        return path.parent
    return path if path.is_dir() else None


class DatasetRecords(Sequence):
    """Records over a `datasets.Dataset`: every row is validated once on load, then converted to
    a record when accessed; embedded images stay undecoded until a model needs them."""

    def __init__(self, dataset, columns: dict[str, str], name: str, validate: bool = True):
        self.columns = {field: columns.get(field, field) for field in RECORD_FIELDS}
        unknown = sorted(set(columns) - set(RECORD_FIELDS))
        if unknown:
            raise DatasetError(
                f"unknown record field(s) {unknown} in the column mapping; fields: {list(RECORD_FIELDS)}",
                file=name,
                field="columns",
            )
        missing = sorted(c for f, c in columns.items() if c not in dataset.column_names)
        if missing or self.columns["prompt"] not in dataset.column_names:
            raise DatasetError(
                f"missing column(s) {missing or [self.columns['prompt']]}; the dataset has {dataset.column_names}",
                file=name,
                field="columns",
            )
        self.dataset, self.name = _undecoded_images(dataset, self.columns["images"]), name
        if len(self.dataset) == 0:
            raise DatasetError("the dataset is empty", file=name)
        if not validate:  # the preflight validates row by row and keeps going (dopd_vl/data/preflight.py)
            return
        seen: dict[str, int] = {}
        for i in range(len(self.dataset)):
            record = self[i]
            if record["id"] in seen:
                raise DatasetError(
                    f"duplicate id (first in row {seen[record['id']]})",
                    file=f"{name} row {i}",
                    record=record["id"],
                    field="id",
                )
            seen[record["id"]] = i

    @classmethod
    def unvalidated(cls, source: str | Path, split: str, columns: dict[str, str]) -> DatasetRecords:
        """The rows of a datasets source, not yet validated: `record(i)` converts without checking."""
        return cls(_open_dataset(source, split), columns, str(source), validate=False)

    def subset(self, indices: list[int]) -> DatasetRecords:
        """The rows at `indices` (still memory-mapped: `Dataset.select` keeps an index map)."""
        return DatasetRecords(
            self.dataset.select(indices), {f: c for f, c in self.columns.items() if c != f}, self.name, validate=False
        )

    def record(self, index: int) -> dict:
        """Row `index` as a record, without validation."""
        return self._record(self.dataset[index], index)

    def iter_records(self, batch_size: int = 1024) -> Iterator[tuple[int, dict | DatasetError]]:
        """(row, its record without validation, or the DatasetError converting it) for every row,
        read a column batch at a time (per-row access formats each row alone: several times slower)."""
        for start in range(0, len(self.dataset), batch_size):
            batch = self.dataset[start : start + batch_size]
            for k in range(len(next(iter(batch.values())))):
                try:
                    yield start + k, self._record({column: values[k] for column, values in batch.items()}, start + k)
                except DatasetError as err:
                    yield start + k, err

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        record = self._record(self.dataset[index], index)
        validate_record(record, file=f"{self.name} row {index}", index=index)
        return record

    def _record(self, row: dict, index: int) -> dict:
        where = f"{self.name} row {index}"
        record: dict = {}
        for field, column in self.columns.items():
            value = row.get(column)
            if value is not None:
                record[field] = value
        record["id"] = str(record["id"]) if "id" in record else f"row-{index}"
        prompt = record.get("prompt")
        if isinstance(prompt, str):  # TRL's plain-text prompt: one user turn
            record["prompt"] = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list):
            record["prompt"] = [_clean_message(m) for m in prompt]
        context = record.get("privileged_context")
        if isinstance(context, list) and all(isinstance(p, dict) and "type" in p and "role" not in p for p in context):
            record["privileged_context"] = [
                {k: v for k, v in p.items() if v is not None} for p in context
            ]  # parts (Arrow fills absent keys with null)
        elif isinstance(context, list):  # messages: their text, in order
            texts = [_message_text(m) for m in context]
            if not all(isinstance(t, str) for t in texts):
                raise DatasetError(
                    "privileged_context must be a string or chat messages with text",
                    file=where,
                    record=record["id"],
                    field=self.columns["privileged_context"],
                )
            record["privileged_context"] = "\n\n".join(texts)
        if isinstance(record.get("answer"), (int, float)) and not isinstance(record["answer"], bool):
            record["answer"] = str(record["answer"])
        for field in ("privileged", "meta"):
            if isinstance(record.get(field), str):  # written as JSON text by our builders' Parquet outputs
                try:
                    record[field] = json.loads(record[field])
                except json.JSONDecodeError as err:
                    raise DatasetError(
                        f"not a JSON object: {err.msg}", file=where, record=record["id"], field=self.columns[field]
                    ) from err
        return record


def json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line of a JSONL file; a line that is not JSON gives,
    instead of its value, the DatasetError naming `path:n`, the line and the column, for the caller
    to raise (or, in a builder's skip mode, to list and go on)."""
    with Path(path).open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line.rstrip("\r\n"))  # without the newline, so an error's column is on this line
            except json.JSONDecodeError as err:  # Python's whole message, its position on the file's line
                value = DatasetError(
                    f"invalid JSON: {err.msg}: line {line_no} column {err.colno} (char {err.pos})",
                    file=f"{path}:{line_no}",
                    record=f"line {line_no}",
                )
            yield line_no, value


def _load_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise DatasetError("file not found", file=str(path))
    records, seen = [], {}
    for line_no, record in json_lines(path):
        if isinstance(record, DatasetError):
            raise record
        validate_record(record, file=f"{path}:{line_no}", index=len(records))
        if record["id"] in seen:
            raise DatasetError(
                f"duplicate id (first on line {seen[record['id']]})",
                file=f"{path}:{line_no}",
                record=record["id"],
                field="id",
            )
        seen[record["id"]] = line_no
        records.append(record)
    if not records:
        raise DatasetError("the dataset is empty", file=str(path))
    return records


def _open_dataset(source: str | Path, split: str):
    """A `datasets.Dataset` (memory-mapped Arrow) from a file, a folder or a dataset id."""
    import datasets

    path = Path(source)
    try:
        if path.is_file() and path.suffix == ".parquet":
            return datasets.Dataset.from_parquet(str(path))
        if path.is_file() and path.suffix == ".arrow":
            return datasets.Dataset.from_file(str(path))
        if path.is_file() and path.suffix in _JSONL_SUFFIXES:
            return datasets.Dataset.from_json(str(path))
        if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
            loaded = datasets.load_from_disk(str(path))
        elif path.exists() or "/" in str(source) or not path.suffix:
            loaded = datasets.load_dataset(str(source), split=split)
        else:
            raise DatasetError(
                "not found (expected a JSONL / Parquet / Arrow file, a dataset folder or a dataset id)",
                file=str(source),
            )
    except DatasetError:
        raise
    except Exception as err:  # datasets raises many types (FileNotFoundError, ValueError, ...)
        raise DatasetError(
            f"cannot be read as a dataset: {type(err).__name__}: {err}".splitlines()[0], file=str(source)
        ) from err
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DatasetError(f"no split {split!r}; splits: {sorted(loaded)}", file=str(source), field="split")
        loaded = loaded[split]
    return loaded


def _undecoded_images(dataset, column: str):
    """Keep embedded images as {bytes, path} until used (decoding every row on load is slow)."""
    import datasets

    inner = getattr(dataset.features.get(column), "feature", None)  # List(Image()) / Sequence(Image())
    if isinstance(inner, datasets.Image) and inner.decode:
        return dataset.cast_column(column, datasets.List(datasets.Image(decode=False)))
    return dataset


def _clean_message(message):
    """Arrow stores parts as structs with every key: drop the null ones ({"type": "image", "text": None})."""
    if not isinstance(message, dict):
        return message
    content = message.get("content")
    if isinstance(content, list):
        content = [
            {k: v for k, v in part.items() if v is not None} if isinstance(part, dict) else part for part in content
        ]
    return {k: v for k, v in {**message, "content": content}.items() if v is not None}


def _message_text(message) -> str | None:
    if not isinstance(message, dict):
        return None
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return None
