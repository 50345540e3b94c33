"""The README and docs/: every link inside the repository leads to a file that exists, and every
`#anchor` to a heading there (as GitHub renders them), so a moved section cannot leave a dead link."""

import re

import pytest

from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces as hyphens (headings in code
    blocks, such as a script's comments, are not headings)."""
    found, fenced = set(), False
    for line in page.read_text(encoding="utf-8").splitlines():
        fenced ^= line.startswith("```")
        if not fenced and (heading := re.match(r"#{1,6} (.+)", line)):
            found.add(re.sub(r"[^\w\- ]", "", heading[1].strip().lower()).replace(" ", "-"))
    return found


def links(page) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_links_lead_to_files_and_headings(page):
    dead = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            dead.append(target)
        elif anchor and anchor not in anchors(file):
            dead.append(target)
    assert not dead, f"{page.relative_to(REPO)}: dead links {dead}"


def test_the_readme_leads_to_every_page_of_docs():
    linked = {(REPO / target.partition("#")[0]).resolve() for target in links(REPO / "README.md")}
    assert set(PAGES[1:]) <= linked, "a page of docs/ the README does not lead to"


def test_anchors_follow_githubs_rule():
    page = REPO / "docs" / "generation.md"
    assert "generation-on-several-replicas-ray" in anchors(page)
    assert "the-papers-settings" in anchors(REPO / "README.md")


def test_every_benchmark_is_in_the_table():
    table = (REPO / "docs" / "testing.md").read_text(encoding="utf-8")
    missing = [p.name for p in (REPO / "benchmarks").glob("*.py") if f"`benchmarks/{p.name}`" not in table]
    assert not missing, f"docs/testing.md's benchmark table lacks {missing}"
