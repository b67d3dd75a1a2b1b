"""The repository is self-contained: no file refers to a document or a path outside it.

A clone must make sense on its own. Every file of the repository (tracked, or new and not
ignored) is scanned for

* the names of design notes that live outside the repository (their upper-case file names),
* paths into a sibling ``shared`` folder or its ``design`` subfolder,
* absolute paths into the machines' home and work folders,
* markdown links (``[text](target)``) whose target leaves the repository or names no file or
  folder of it.

Architecture and algorithms are documented in docs/architecture.md and docs/algorithms.md;
code and docs cite those.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Spelled in pieces so that this file does not match its own patterns.
_OUTSIDE_DOCS = ("ARCHITECTURE", "ALGORITHMS", "ENVIRONMENT", "PEERS", "STYLE")
_FORBIDDEN: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "design note outside the repository",
        re.compile(r"\b(?:" + "|".join(_OUTSIDE_DOCS) + r")" + r"\.md\b"),
    ),
    ("path into a sibling shared folder", re.compile(r"\.\./+" + "shared" + r"\b")),
    ("path into the shared design notes", re.compile(r"\b" + "shared" + r"/+" + "design" + r"\b")),
    ("absolute path outside the repository", re.compile(r"(?<![\w.~-])/(?:" + "work" + "|" + "root" + r")/")),
)

# [text](target) and [text](<target> "title"); images ![alt](target) match too.
_MD_LINK = re.compile(r"\[[^\]\n]*\]\(\s*(?:<([^>\n]*)>|([^)\s]+))(?:\s+[\"'(][^)\n]*)?\)")
# [label]: target   (reference-style definitions)
_MD_REF = re.compile(r"^\s{0,3}\[[^\]\n]+\]:\s*<?([^>\s]+)>?", re.MULTILINE)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")

# files that are data, not text a reader follows
_BINARY_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".svg", ".ico", ".pdf", ".npz", ".pt", ".parquet"}


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    what: str
    text: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}: {self.text}"


def repository_files(root: Path = ROOT) -> list[str]:
    """Tracked files plus new files git does not ignore, relative to ``root`` (posix)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root, capture_output=True, check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: cannot tell the repository's files apart")
    names = sorted({name for name in listed.decode().split("\0") if name})
    return [name for name in names if (root / name).is_file()]


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _link_target_problem(source: str, target: str, known: set[str]) -> str | None:
    """Why a markdown link target in file ``source`` is not a file or folder of the repository."""
    target = target.strip()
    if not target or target.startswith("#") or _SCHEME.match(target) or target.startswith("//"):
        return None  # an anchor, a URL (http:, mailto:, ...) or a protocol-relative URL
    path = target.split("#", 1)[0].split("?", 1)[0]
    if not path:
        return None
    if path.startswith("/"):
        return "markdown link to an absolute path"
    parts: list[str] = []
    for part in PurePosixPath(source).parent.joinpath(path).parts:
        if part == "..":
            if not parts:
                return "markdown link that leaves the repository"
            parts.pop()
        elif part != ".":
            parts.append(part)
    resolved = "/".join(parts)
    if resolved in known or any(name.startswith(resolved + "/") for name in known):
        return None
    return "markdown link to a file that is not in the repository"


def check_text(path: str, text: str, known: set[str] | None = None) -> list[Finding]:
    """Every reference in ``text`` (the contents of repository file ``path``) to something outside.

    ``known`` is the set of the repository's files; markdown links are checked against it
    when given and ``path`` is a markdown file.
    """
    found = []
    for what, pattern in _FORBIDDEN:
        for match in pattern.finditer(text):
            found.append(Finding(path, _line_of(text, match.start()), what, match.group(0)))
    if known is not None and path.lower().endswith((".md", ".markdown")):
        for pattern in (_MD_LINK, _MD_REF):
            for match in pattern.finditer(text):
                target = next(g for g in match.groups() if g is not None) if match.groups() else ""
                problem = _link_target_problem(path, target, known)
                if problem is not None:
                    found.append(Finding(path, _line_of(text, match.start()), problem, match.group(0)))
    return found


def _read_text(path: Path) -> str | None:
    if path.suffix.lower() in _BINARY_SUFFIXES:
        return None
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def test_no_file_refers_outside_the_repository() -> None:
    files = repository_files()
    known = set(files)
    findings: list[Finding] = []
    for name in files:
        text = _read_text(ROOT / name)
        if text is not None:
            findings += check_text(name, text, known)
    assert not findings, "references outside the repository (point them at docs/ instead):\n" + "\n".join(
        str(f) for f in findings
    )


def test_the_architecture_and_algorithm_docs_exist() -> None:
    for doc in ("docs/architecture.md", "docs/algorithms.md"):
        assert (ROOT / doc).is_file(), f"{doc} is missing; code and docs cite it"


DESIGN_NOTE = "ALGO" + "RITHMS.md"
ENV_NOTE = "ENVIRON" + "MENT.md"
SIBLING = ".." + "/shared"


@pytest.mark.parametrize(
    ("text", "what"),
    [
        (f'"""Exact decoding (see {DESIGN_NOTE} §5.3)."""', "design note outside the repository"),
        (f"# measured as in {ENV_NOTE}, 'Ray on one machine'", "design note outside the repository"),
        (f"The math is in `{SIBLING}/notes.md`.", "path into a sibling shared folder"),
        ("see " + "shared" + "/" + "design" + "/notes.txt", "path into the shared design notes"),
        ("cache = '/" + "root" + "/.cache/x'", "absolute path outside the repository"),
        ("open('/" + "work" + "/main/data.csv')", "absolute path outside the repository"),
    ],
)
def test_a_planted_reference_is_caught(text: str, what: str) -> None:
    findings = check_text("compressors/example.py", text)
    assert [f.what for f in findings] == [what]
    assert findings[0].line == 1


def test_planted_markdown_links_are_caught() -> None:
    known = {"docs/algorithms.md", "docs/img/plot.png", "README.md"}
    text = "\n".join(
        [
            "[ok](algorithms.md#1-powersgd) [ok](img/plot.png) [dir](img) [up](../README.md)",
            "[web](https://example.org/x.md) [anchor](#notation) [mail](mailto:a@b.c)",
            "[escape](../../elsewhere/notes.md)",
            "[missing](algorithm.md)",
            "![abs](/etc/passwd)",
            "[ref]: ../../outside.md",
        ]
    )
    findings = check_text("docs/page.md", text, known)
    assert [(f.line, f.what) for f in findings] == [
        (3, "markdown link that leaves the repository"),
        (4, "markdown link to a file that is not in the repository"),
        (5, "markdown link to an absolute path"),
        (6, "markdown link that leaves the repository"),
    ]


def test_ordinary_paths_are_not_flagged() -> None:
    text = "\n".join(
        [
            "checkpoint.storage=/mnt/shared/gradwire",  # a user's own shared mount
            "docs/architecture.md and docs/algorithms.md",  # the repository's own docs
            "WORKDIR /app; /tmp/ray; ~/work/x; s3://bucket/root/",
            "sharedesign shared_design",
        ]
    )
    assert check_text("docs/deploy.md", text, set()) == []
