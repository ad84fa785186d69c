"""Where a dataset's image paths may lead (docs/design.md §3.1).

A record's image path is data, and data can come from someone else: a path like
`../../home/me/.ssh/id_rsa.png` or a symlink in the dataset folder must not make training, the
preflight or the shareable routing page read (or inline) a file the user never meant to use. So every
path, symlinks resolved, must land inside an allowed root:
- the dataset's own folder (a file's folder, a dataset folder itself);
- the recipe's `data.image_roots` (the user's own word, for images kept elsewhere);
- the folders listed in the user's trusted-roots file, `image_roots.txt` in `$DOPD_VL_CONFIG_DIR`
  (default `$XDG_CONFIG_HOME/dopd-vl`, i.e. `~/.config/dopd-vl`). The builders add the image folders
  their outputs point into, so a builder's output works without configuration on the machine that
  built it. The file lives outside every dataset: a dataset cannot widen its own roots.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dopd_vl.errors import DatasetError, ImageOutsideRoots

__all__ = ["ImageRoots", "image_roots", "trusted_roots_file", "trusted_image_roots", "trust_image_roots"]

logger = logging.getLogger(__name__)


def trusted_roots_file() -> Path:
    config = (
        os.environ.get("DOPD_VL_CONFIG_DIR")
        or Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "dopd-vl"
    )
    return Path(config) / "image_roots.txt"


def trusted_image_roots() -> list[Path]:
    """The trusted-roots file's folders: one absolute path per line, `#` starts a comment."""
    file = trusted_roots_file()
    if not file.is_file():
        return []
    roots = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if not Path(line).is_absolute():
            logger.warning("%s:%d: %r is not an absolute path; ignored", file, number, line)
            continue
        roots.append(Path(line))
    return roots


def trust_image_roots(folders: Iterable[str | Path]) -> list[Path]:
    """Add folders to the user's trusted-roots file (the builders call this for the image folders
    their outputs point into); returns the ones that were new. A folder inside a listed one is
    already covered and is not added."""
    known = [p.resolve() for p in trusted_image_roots()]
    new: list[Path] = []
    for folder in sorted({Path(f).resolve() for f in folders}):
        if not any(folder == k or k in folder.parents for k in known + new):
            new.append(folder)
    if new:
        file = trusted_roots_file()
        file.parent.mkdir(parents=True, exist_ok=True)
        header = (
            ""
            if file.exists()
            else "# Image folders dopd-vl may read dataset images from (docs/design.md §3.1); one absolute path per "
            "line.\n"
        )
        with file.open("a", encoding="utf-8") as f:  # appends: concurrent builders do not drop each other's lines
            f.write(header + "".join(f"{p}\n" for p in new))
        logger.info("trusted image folder(s) added to %s: %s", file, ", ".join(map(str, new)))
    return new


@dataclass(frozen=True)
class ImageRoots:
    """`base`: what relative paths resolve against (None: a hub dataset, paths must be absolute);
    `allowed`: resolved folders every image must lie in."""

    base: Path | None
    allowed: tuple[Path, ...]

    def resolve(self, image: str, record: str, field: str = "prompt.image") -> Path:
        """The image's real path (symlinks resolved); ImageOutsideRoots when it leaves the roots."""
        path = Path(image)
        if not path.is_absolute():
            if self.base is None:
                raise DatasetError(
                    "relative image path but no dataset folder to resolve it against", record=record, field=field
                )
            path = self.base / path
        real = path.resolve()
        if not any(real == root or root in real.parents for root in self.allowed):
            roots = ", ".join(map(str, self.allowed)) or "none"
            raise ImageOutsideRoots(
                f"image path {image!r} resolves to {real}, outside the allowed image roots ({roots}); if you trust "
                f"this dataset, "
                f"add that folder to data.image_roots in the recipe or to {trusted_roots_file()}",
                record=record,
                field=field,
            )
        return real


def image_roots(base: str | Path | ImageRoots | None, extra: Iterable[str | Path] = ()) -> ImageRoots:
    """The roots of a dataset whose folder is `base`, with the recipe's `extra` folders and the
    trusted-roots file (read now, once). An ImageRoots is returned as it is."""
    if isinstance(base, ImageRoots):
        return base
    base = Path(base).resolve() if base is not None else None
    folders = ([base] if base is not None else []) + [Path(p).expanduser() for p in extra] + trusted_image_roots()
    return ImageRoots(base, tuple(dict.fromkeys(p.resolve() for p in folders)))
