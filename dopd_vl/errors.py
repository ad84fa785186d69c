"""One exception family per domain; the CLI prints their message on one line and exits non-zero."""

from __future__ import annotations


class DopdError(Exception):
    """Base of every error dopd-vl raises on purpose."""


class DatasetError(DopdError, ValueError):
    """A bad dataset file or record; the message names the file, the record id and the field."""

    def __init__(self, message: str, *, file: str | None = None, record: str | None = None, field: str | None = None):
        self.file, self.record, self.field = file, record, field
        where = ", ".join(f"{k} {v}" for k, v in (("file", file), ("record", record), ("field", field)) if v is not None)
        super().__init__(f"{where}: {message}" if where else message)


class ConfigError(DopdError, ValueError):
    """A bad recipe key or value."""


class ModelError(DopdError, ValueError):
    """Models that cannot be used together (tokenizers, vocabularies) or cannot be loaded."""
