"""The repository's own design document: every `docs/design.md §N.N` citation in the package, the
examples, the docs, the configs and the generated summaries names a section that exists, and no
file cites a document that is not in the repository."""

import re
import shutil
from pathlib import Path

from conftest import REPO

SECTION = re.compile(r"^#{2,3}\s+(\d+(?:\.\d+)?)\.?\s", re.MULTILINE)
CITATION = re.compile(r"§\s*(\d+(?:\.\d+)?)")
OUTSIDE = re.compile(r"DESIGN\.md|\.\./shared/[A-Z]+\.md")


def cited_files() -> list[Path]:
    files = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]
    for folder, patterns in (
        ("dopd_vl", ("*.py",)),
        ("data_builders", ("*.py",)),
        ("examples", ("*.py", "*.md")),
        ("configs", ("*.yaml",)),
        ("bench", ("*.py",)),
    ):
        for pattern in patterns:
            files += sorted((REPO / folder).rglob(pattern))
    return files


def missing_citations(design: Path, files: list[Path]) -> list[str]:
    sections = set(SECTION.findall(design.read_text(encoding="utf-8")))
    sections |= {s.split(".")[0] for s in sections}

    def name(f: Path) -> str:
        return str(f.relative_to(REPO)) if f.is_relative_to(REPO) else str(f)

    return [
        f"{name(f)}: §{n}" for f in files for n in CITATION.findall(f.read_text(encoding="utf-8")) if n not in sections
    ]


def test_every_design_citation_names_an_existing_section():
    files = cited_files()
    assert missing_citations(REPO / "docs" / "design.md", files) == []
    assert sum(len(CITATION.findall(f.read_text(encoding="utf-8"))) for f in files) >= 20  # the package does cite it


def test_removing_a_heading_is_caught(tmp_path):
    copy = tmp_path / "design.md"
    shutil.copy(REPO / "docs" / "design.md", copy)
    text = copy.read_text(encoding="utf-8")
    copy.write_text(re.sub(r"^### 1\.3 .*$", "### Thresholds", text, flags=re.MULTILINE), encoding="utf-8")
    missing = missing_citations(copy, cited_files())
    assert "dopd_vl/training/trainer.py: §1.3" in missing


def test_no_file_cites_a_document_outside_the_repository():
    offenders = [str(f.relative_to(REPO)) for f in cited_files() if OUTSIDE.search(f.read_text(encoding="utf-8"))]
    assert offenders == []
