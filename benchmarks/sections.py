"""docs/benchmarks.md is made of sections, each written by one benchmark between its own markers."""

from __future__ import annotations

from pathlib import Path

HEADER = (
    "# Benchmarks\n\n"
    "Measured numbers for gradwire. Each section is written by the script named in it; rerun the "
    "script to refresh its section (other sections are kept).\n"
)


def write_section(path: Path, section: str, begin: str, end: str) -> None:
    """Replace the text from ``begin`` to ``end`` in ``path`` with ``section`` (which carries both
    markers), or append ``section`` when the markers are not there yet."""
    text = path.read_text() if path.exists() else HEADER
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + section.strip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
