"""File modes of what the package writes: what a file created normally would get (0644 under the
usual umask 022), also for files that reach their place through a temporary file (mkstemp gives
0600) or a library that writes that way (save_pretrained's safetensors shards), so that datasets,
checkpoints and trained students are readable by whoever may read the user's other files."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["created_mode", "give_created_modes", "atomic_write_text"]


def created_mode(directory: bool = False) -> int:
    """The permission bits a file (or folder) created now would get under the process's umask."""
    umask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def give_created_modes(folder: str | Path) -> None:
    """Every file (and folder) under `folder`, written by us, gets the mode a created one would."""
    file_mode, dir_mode = created_mode(), created_mode(directory=True)
    for root, dirs, files in os.walk(folder):
        for name in files:
            os.chmod(os.path.join(root, name), file_mode)
        for name in dirs:
            os.chmod(os.path.join(root, name), dir_mode)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file whole or not at all: a temporary file beside it, renamed into place, with
    the mode a created file gets."""
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, created_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
