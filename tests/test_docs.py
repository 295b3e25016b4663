"""The README and docs/ as a newcomer meets them: short, every link leading somewhere, every page reachable,
the test command the one CI runs, and nothing that points outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# A file or an issue tracker a user of the repository never sees.
OUTSIDE = re.compile(r"DESIGN\.md|STYLE\.md|\bSTYLE \d|\.\./shared|\bissues? #?\d+", re.IGNORECASE)


def _relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(page.read_text()) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    missing = [t for t in _relative_links(page) if not (page.parent / t.split("#")[0]).exists()]
    assert missing == [], f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_readme_is_short_and_reaches_every_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250
    linked = {(ROOT / t.split("#")[0]).resolve() for t in _relative_links(README)}
    assert [p.name for p in PAGES if p.resolve() not in linked] == []


def test_every_readme_section_links_its_docs_page():
    sections = re.split(r"^## ", README.read_text(), flags=re.MULTILINE)[1:]
    assert len(sections) >= 10
    bare = [s.splitlines()[0] for s in sections if "](docs/" not in s]
    assert bare == []


def test_readme_test_command_is_what_ci_runs():
    """The first command in a README code block that runs the tests is a line of .ci/run."""
    text = README.read_text()
    fenced = [line for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S) for line in block.splitlines()]
    command = next(line for line in fenced if "make test" in line or "pytest" in line)
    assert command.startswith("make test")
    assert command in (ROOT / ".ci" / "run").read_text()


def test_nothing_points_outside_the_repository():
    # the Makefile alone names the shared folder beside the clone, where CI's copy of calvin_env lies
    code = [p for d in ("src", "tests", "bench") for p in sorted((ROOT / d).rglob("*.py")) if p != Path(__file__)]
    files = [README, *PAGES, *sorted((ROOT / "conf").rglob("*.yaml")), *code, ROOT / "dvc.yaml"]
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in files
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert found == []
