"""The README is a short front page whose every link, and every link of the user guide, leads to
a file (and heading) that exists; every guide page is one click from the README."""

import re
from pathlib import Path

import pytest

from launching import ROOT

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
DOCUMENTS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "docs/faults.md",
             ROOT / "docs/benchmarks/README.md",
             ROOT / "docs/benchmarks/2026-11-27-to-12-02-rounds-and-levers.md",
             *sorted((ROOT / "docs/guide").glob("*.md"))]
TEST_COMMAND = "python -m pytest -q -n 2 tests"


def prose_lines(path: Path) -> list[str]:
    """The lines of a markdown file outside fenced code blocks."""
    lines, fenced = [], False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def anchors(path: Path) -> set[str]:
    """The heading anchors GitHub makes: lower case, punctuation dropped, spaces to hyphens,
    repeats numbered."""
    seen: dict[str, int] = {}
    result = set()
    for line in prose_lines(path):
        match = re.match(r"#{1,6}\s+(.*)", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def relative_links(path: Path) -> list[str]:
    links = [m.group(1) for line in prose_lines(path) for m in LINK.finditer(line)]
    return [link for link in links if not re.match(r"[a-z]+:", link)]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(document):
    broken = []
    for link in relative_links(document):
        target, _, anchor = link.partition("#")
        resolved = (document.parent / target).resolve() if target else document
        if not resolved.exists():
            broken.append(f"{link} (no file {resolved})")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{link} (no heading #{anchor} in {resolved.name})")
    assert not broken, f"{document.relative_to(ROOT)}: broken links: {'; '.join(broken)}"


def test_every_guide_page_is_one_click_from_the_readme():
    readme = ROOT / "README.md"
    linked = {(readme.parent / link.partition("#")[0]).resolve()
              for link in relative_links(readme)}
    pages = set((ROOT / "docs/guide").glob("*.md"))
    assert not sorted(p.name for p in pages if p.resolve() not in linked)


def test_the_readme_is_a_front_page_with_the_test_command_first():
    """Short (issue 39: at most about 150 lines), and the first pytest command in it is the one
    .ci/run runs (shared hooks find the test command by that first match)."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    first = re.search(r"(python -m pytest|pytest)[^`\n]*", text).group(0).strip()
    assert first == TEST_COMMAND
    assert (ROOT / ".ci/run").read_text().rstrip().endswith(TEST_COMMAND)
