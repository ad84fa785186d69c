"""Progress bars that suit where they are read (core): tqdm's live bar on a terminal; elsewhere (CI,
`nohup`, SLURM logs, a redirected stderr) one plain line at most every 30 s instead of hundreds of
carriage-return updates glued into one line. Log records go through `tqdm.write` while a bar is
shown (the CLI's `logging_redirect_tqdm`), so a log line never lands inside a bar."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

__all__ = ["progress_bar", "PLAIN_INTERVAL_S"]

PLAIN_INTERVAL_S = 30.0
"""Seconds between a bar's lines when stderr is not a terminal."""


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """`tqdm(iterable, **kwargs)`, written as plain periodic lines when stderr is not a terminal."""
    stream = kwargs.get("file", sys.stderr)
    if not _is_terminal(stream):
        kwargs.setdefault("mininterval", PLAIN_INTERVAL_S)
        kwargs["file"] = PlainLines(stream)
        kwargs.setdefault("ascii", True)
        kwargs.setdefault("dynamic_ncols", False)
        kwargs.setdefault("ncols", 100)
    return tqdm(iterable, **kwargs)


class PlainLines:
    """A stream for tqdm that turns its carriage-return redraws into whole lines."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        for part in text.replace("\r", "\n").split("\n"):
            if part.strip():
                self.stream.write(part.rstrip() + "\n")

    def flush(self) -> None:
        self.stream.flush()


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or file-like stream without isatty
        return False
