"""Text that points somewhere: every `docs/<page>.md` the code, tests and docs name exists,
every relative Markdown link of the README and docs/ reaches a file (and a heading, when
it names one), and nothing cites notes that are not in the repository or tracker items
instead of saying what it means."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("gem", "pipeline", "jobs", "tests", "benchmarks", "deploy", "docs")
# notes kept outside the repository (spelled in parts so this file does not name them)
OUTSIDE_NOTES = ("DESIGN" + ".md", "gem-" + "math", "ovss-" + "math")
DOC_PATH = re.compile(r"\bdocs/[\w.-]+\.md\b")
MD_LINK = re.compile(r"\]\((?!https?://|mailto:)([^)#\s]+\.md)(?:#([^)\s]+))?\)")
TRACKER = re.compile(r"\bissues? \d+\b", re.IGNORECASE)


def texts() -> list[Path]:
    """The repository's code and docs: .py, .md, .yaml, .sh files, the README, the Makefile."""
    found = [ROOT / "README.md", ROOT / "Makefile", ROOT / "pyproject.toml"]
    for folder in SOURCES:
        for suffix in ("*.py", "*.md", "*.yaml", "*.yml", "*.sh"):
            found += (ROOT / folder).rglob(suffix)
    return sorted(p for p in found if p.is_file())


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\s-]", "", heading.strip().lower())
    return re.sub(r"\s", "-", text)


def anchors(page: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"(?m)^#+\s+(.*)$", page.read_text())}


def test_named_docs_pages_exist():
    missing = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in texts()
        for name in DOC_PATH.findall(path.read_text())
        if not (ROOT / name).is_file()
    ]
    assert missing == []


def test_markdown_links_reach_a_file_and_heading():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    broken = []
    for page in pages:
        for target, anchor in MD_LINK.findall(page.read_text()):
            linked = (page.parent / target).resolve()
            if not linked.is_file():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif anchor and anchor not in anchors(linked):
                broken.append(f"{page.relative_to(ROOT)}: {target}#{anchor}")
    assert broken == []


@pytest.mark.parametrize("pattern", [*OUTSIDE_NOTES, TRACKER.pattern])
def test_nothing_cites_what_is_not_here(pattern):
    regex = TRACKER if pattern == TRACKER.pattern else re.compile(re.escape(pattern))
    cited = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in texts()
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if regex.search(line)
    ]
    assert cited == []


def test_the_checks_find_what_they_look_for():
    assert DOC_PATH.findall("see docs/gem.md and docs/ovss.md.") == ["docs/gem.md", "docs/ovss.md"]
    assert MD_LINK.findall("[a](gem.md#cost) [b](https://x.org/a.md) [c](../README.md)") == [
        ("gem.md", "cost"),
        ("../README.md", ""),
    ]
    assert slug("Cost: the arithmetic floor") == "cost-the-arithmetic-floor"
    assert TRACKER.search("as issue " + "22, item 2 asked") and not TRACKER.search("tissue 3")
