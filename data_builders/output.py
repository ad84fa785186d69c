"""Writing builder outputs atomically, and the build report every builder returns.

Outputs: `.jsonl` (image paths relative to the file's folder), `.parquet`, or any other name: a
`save_to_disk` folder; `embed_images=True` stores the image bytes in an `images` column (TRL's
vision convention) so the dataset is one portable artifact. In Parquet and folder outputs the
free-form `privileged` and `meta` fields are JSON text (Arrow needs one type per column);
`dopd_vl.data.sources.load_records` reads them back as dicts.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from dopd_vl.data.image_roots import trust_image_roots
from dopd_vl.data.images import image_parts
from dopd_vl.data.schema import validate_record
from dopd_vl.errors import DatasetError
from dopd_vl.files import created_mode

__all__ = [
    "BuildReport",
    "write_jsonl_atomic",
    "write_dataset_atomic",
    "finish_build",
    "skipped_path",
    "trust_image_folders",
    "check_on_error",
    "created_mode",
    "portable_source",
]


@dataclass
class BuildReport:
    records: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"id", "file", "reason"}
    counts: Counter = field(default_factory=Counter)  # e.g. questions per type, objects, leaks
    leaks: list[dict] = field(default_factory=list)  # hint builders: {"id", "hints": [indices], "answer"}
    files: dict[str, bytes] = field(default_factory=dict)  # written beside a JSONL output (relative path -> bytes)

    def summary(self) -> str:
        extra = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        return f"{len(self.records)} records, {len(self.skipped)} skipped" + (f"; {extra}" if extra else "")


def check_on_error(on_error: str) -> None:
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")


def write_jsonl_atomic(path: str | Path, rows: list[dict], files: dict[str, bytes] | None = None) -> None:
    """Write to a temporary file beside `path`, then rename: never a partial file at `path`.

    `files` (relative path -> bytes, all inside one folder beside `path`, e.g. the images of a
    dataset that had them only as bytes) are staged in a temporary folder and put in place with
    the JSONL: a failure leaves neither behind, and a previous folder of that name is replaced.
    Outputs get the mode a file created normally gets (0644 under umask 022), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder, staging, old = _stage_files(path.parent, files) if files else (None, None, None)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, created_mode())
        if folder is not None:
            if folder.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=path.parent))
                os.replace(folder, old / folder.name)
            os.replace(staging, folder)
            staging = None
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        if staging is None and folder is not None:  # the new folder went in, the JSONL did not
            shutil.rmtree(folder, ignore_errors=True)
        if old is not None and folder is not None and (old / folder.name).exists():
            os.replace(old / folder.name, folder)
        raise
    finally:
        for leftover in (staging, old):
            if leftover is not None:
                shutil.rmtree(leftover, ignore_errors=True)


def _stage_files(parent: Path, files: dict[str, bytes]) -> tuple[Path, Path, None]:
    """Write `files` into a temporary sibling of the one folder they name; (folder, staging, None)."""
    tops = {Path(rel).parts[0] for rel in files}
    if len(tops) != 1 or any(
        Path(rel).is_absolute() or ".." in Path(rel).parts or len(Path(rel).parts) < 2 for rel in files
    ):
        raise ValueError(f"files must lie in one folder beside the output, got {sorted(files)[:3]}")
    folder = parent / tops.pop()
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=parent))
    try:
        for rel, data in files.items():
            target = staging.joinpath(*Path(rel).parts[1:])
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        os.chmod(staging, created_mode(directory=True))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder, staging, None


def portable_source(source: str, out: str | Path) -> str:
    """Where a record came from, without the builder's machine in it: a local path relative to the
    output's folder (as image paths are), its file name if no relative path exists, else as given
    (a dataset id)."""
    path = Path(source)
    if not path.is_absolute() and not path.exists():
        return source
    try:
        return os.path.relpath(path.resolve(), Path(out).resolve().parent)
    except ValueError:  # another drive: no relative path
        return path.name


def write_dataset_atomic(path: str | Path, records: list[dict], embed_images: bool = False) -> None:
    """Records as Parquet (`.parquet`) or a `save_to_disk` folder, via a temporary sibling that is
    renamed into place: never a partial output at `path`."""
    import datasets

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent if path.suffix == ".parquet" else path  # what relative image paths resolve against
    rows = [_arrow_row(r, path.parent, base, embed_images) for r in records]
    dataset = datasets.Dataset.from_list(rows)
    if any("images" in r for r in rows):
        dataset = dataset.cast_column("images", datasets.List(datasets.Image()))
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        if path.suffix == ".parquet":
            dataset.to_parquet(str(tmp / path.name))
            os.replace(tmp / path.name, path)
        else:
            dataset.save_to_disk(str(tmp / "dataset"))
            old = path.parent / f".{path.name}.old" if path.exists() else None
            if old is not None:
                os.replace(path, old)
            os.replace(tmp / "dataset", path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _arrow_row(record: dict, out_dir: Path, base: Path, embed_images: bool) -> dict:
    row = {k: (json.dumps(v, ensure_ascii=False) if k in ("privileged", "meta") else v) for k, v in record.items()}
    prompt = json.loads(json.dumps(record["prompt"]))
    embedded = iter(record.get("images") or [])
    images = []  # in prompt order: the record's embedded images, and the files embedded now
    for message in prompt:
        for part in message["content"] if isinstance(message["content"], list) else []:
            if part.get("type") != "image":
                continue
            if not isinstance(part.get("image"), str):
                images.append(next(embedded))
            elif embed_images:
                file = (
                    (out_dir / part["image"]).resolve()
                    if not Path(part["image"]).is_absolute()
                    else Path(part["image"])
                )
                images.append({"bytes": file.read_bytes(), "path": file.name})
                del part["image"]
            else:
                file = (
                    (out_dir / part["image"]).resolve()
                    if not Path(part["image"]).is_absolute()
                    else Path(part["image"])
                )
                part["image"] = os.path.relpath(file, base.resolve())
    row["prompt"] = prompt
    if images:
        row["images"] = images
    return row


def skipped_path(out: str | Path) -> Path:
    """Where a build lists the inputs it skipped: OUT.skipped.jsonl for OUT.jsonl (or OUT.parquet, or
    a dataset folder OUT)."""
    out = Path(out)
    return out.with_suffix(".skipped.jsonl") if out.suffix in (".jsonl", ".parquet") else Path(f"{out}.skipped.jsonl")


def finish_build(report: BuildReport, out: str | Path, embed_images: bool = False) -> BuildReport:
    """Validate every record with the engine's schema, check ids, then write OUT (and its skip list,
    `skipped_path`): JSONL, Parquet or a `save_to_disk` folder by OUT's name."""
    if Path(out).suffix == ".jsonl" and embed_images:
        raise DatasetError("--embed-images needs a .parquet file or a dataset folder as --out", file=str(out))
    if not report.records:
        reasons = f" ({len(report.skipped)} skipped; first: {report.skipped[0]['reason']})" if report.skipped else ""
        raise DatasetError(f"the dataset is empty: no record was built{reasons}", file=str(out))
    seen: set[str] = set()
    for i, record in enumerate(report.records):
        validate_record(record, file=str(out), index=i)
        if record["id"] in seen:
            raise DatasetError("duplicate record id", file=str(out), record=record["id"], field="id")
        seen.add(record["id"])
    if report.skipped:
        write_jsonl_atomic(skipped_path(out), report.skipped)
    if Path(out).suffix == ".jsonl":
        write_jsonl_atomic(out, report.records, report.files)
    else:
        write_dataset_atomic(out, report.records, embed_images)
    if not embed_images:
        trust_image_folders(report.records, out)
    return report


def trust_image_folders(records: list[dict], out: str | Path) -> list[Path]:
    """Record the image folders the output points into outside its own folder in the user's
    trusted roots (`dopd_vl.data.image_roots`), so training on it needs no `data.image_roots`. Only
    folders this builder read images from (already confined to its --images root) are added."""
    out = Path(out)
    base = (out.parent if out.suffix in (".jsonl", ".parquet") else out).resolve()
    folders = set()
    for record in records:
        for ref in image_parts(record):
            if isinstance(ref, str):
                image = Path(ref) if Path(ref).is_absolute() else out.parent / ref
                folder = image.resolve().parent
                if folder != base and base not in folder.parents:
                    folders.add(folder)
    return trust_image_roots(folders)
