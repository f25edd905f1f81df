"""The documentation holds together: every relative link and anchor in README.md, CONTRIBUTING.md and docs/
resolves, the README stays a five-minute read, and the docs describe the product as it is (history goes in
CHANGELOG.md). The checker itself is tested on small broken examples, so a passing run means something."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 260
HISTORY = re.compile(r"\bissue \d+|\bthis session\b|\bprevious run\b", re.IGNORECASE)

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")


def doc_files(root: Path = ROOT) -> list[Path]:
    """The checked documents: README.md, CONTRIBUTING.md and every docs/*.md (CHANGELOG.md is not one)."""
    files = [root / "README.md", root / "CONTRIBUTING.md", *sorted((root / "docs").glob("*.md"))]
    return [f for f in files if f.exists()]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """``(line number, line)`` for every line outside fenced code blocks."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text lowercased, punctuation but ``-`` and ``_`` dropped,
    spaces turned into ``-``."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading renders as its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML renders as nothing
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a document; a repeated heading gets ``-1``, ``-2``, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(text):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def links(text: str) -> list[tuple[int, str]]:
    """``(line number, target)`` of every Markdown link and image outside code (fenced or inline)."""
    found = []
    for number, line in prose_lines(text):
        for match in LINK.finditer(INLINE_CODE.sub("", line)):
            found.append((number, match.group(1)))
    return found


def broken_links(path: Path) -> list[str]:
    """Relative links of ``path`` whose file does not exist, or whose anchor names no heading of the target."""
    problems = []
    for number, target in links(path.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = path if not file_part else (path.parent / file_part).resolve()
        where = f"{path.name}:{number}: {target}"
        if not dest.exists():
            problems.append(f"{where}: no such file")
        elif anchor:
            if dest.is_dir() or dest.suffix != ".md":
                problems.append(f"{where}: an anchor into a file that has no headings")
            elif anchor not in anchors(dest.read_text()):
                problems.append(f"{where}: no heading with anchor #{anchor} in {dest.name}")
    return problems


def history_phrases(path: Path) -> list[str]:
    return [
        f"{path.name}:{number}: {line.strip()}"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if HISTORY.search(line)
    ]


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(path):
    assert broken_links(path) == []


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_describe_the_product_not_its_history(path):
    assert history_phrases(path) == [], "history belongs in CHANGELOG.md"


def test_the_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_the_documents_are_there():
    names = {p.relative_to(ROOT).as_posix() for p in doc_files()}
    assert {"README.md", "CONTRIBUTING.md", "docs/index.md", "docs/method.md"} <= names
    assert (ROOT / "CHANGELOG.md").exists()


def test_slugs_follow_github():
    assert slug("Quick start") == "quick-start"
    assert slug("Training step (`python benchmarks/train_step.py`)") == "training-step-python-benchmarkstrain_steppy"
    assert slug("Does ASQ's step follow the sample? (Fashion-MNIST ResNet-20)") == (
        "does-asqs-step-follow-the-sample-fashion-mnist-resnet-20"
    )
    assert slug("The device check (`python benchmarks/gpu_check.py --out DIR`)") == (
        "the-device-check-python-benchmarksgpu_checkpy---out-dir"
    )
    assert slug("See [the guide](x.md) now") == "see-the-guide-now"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n### A\n") == {"a", "a-1", "a-2"}


def test_the_checker_finds_broken_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text("# Guide\n\n## Usage notes\n\n## Usage notes\n")
    (tmp_path / "README.md").write_text(
        "# Project\n\n"
        "[good](docs/guide.md) [good anchor](docs/guide.md#usage-notes) [second](docs/guide.md#usage-notes-1)\n"
        "[self](#project) [web](https://example.com/missing.md) `[in code](missing.md)`\n"
        "[missing file](docs/nope.md) [missing anchor](docs/guide.md#usage) [bad self](#nothing)\n"
        "[third](docs/guide.md#usage-notes-2) ![image](docs/figure.png)\n"
        "```\n[in a fence](fenced.md)\n```\n"
    )
    problems = broken_links(tmp_path / "README.md")
    assert [p.split(": ", 1)[1] for p in problems] == [
        "docs/nope.md: no such file",
        "docs/guide.md#usage: no heading with anchor #usage in guide.md",
        "#nothing: no heading with anchor #nothing in README.md",
        "docs/guide.md#usage-notes-2: no heading with anchor #usage-notes-2 in guide.md",
        "docs/figure.png: no such file",
    ]


def test_the_checker_finds_history(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("Fast since issue 12.\nThis session added it.\nAs in the previous run.\nIssue-free text.\n")
    assert len(history_phrases(doc)) == 3
