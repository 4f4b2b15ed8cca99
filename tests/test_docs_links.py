"""Every relative link in README.md and docs/*.md leads somewhere: the file (or folder) exists, and
a `#fragment` into a Markdown file names one of its headings, as GitHub renders their anchors.
The README links every docs page ("Where to go next"), and every docs page opens with who it is
for. Links to other sites are not fetched (the tests run offline)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1)(?:[^\n]|\n(?!\s*\n)))+?\1")
_INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _prose(text: str) -> str:
    """`text` with fenced code blocks and code spans blanked out, its line breaks kept."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line.lstrip()):
            fenced = not fenced
            line = ""
        lines.append("" if fenced else line)
    # A code span may run over a line break (never over a blank line).
    return _CODE_SPAN.sub(lambda m: "\n" * m.group(0).count("\n"), "\n".join(lines))


def links(text: str) -> list[tuple[int, str]]:
    """Every link target written in the Markdown `text`, with the line it ends on."""
    prose = _prose(text)
    found = [(prose.count("\n", 0, m.end()) + 1, m.group(1)) for m in _INLINE.finditer(prose)]
    for number, line in enumerate(prose.splitlines(), 1):
        reference = _REFERENCE.match(line)
        if reference:
            found.append((number, reference.group(1)))
    return sorted(found, key=lambda item: item[0])


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces become hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a Markdown file's headings; a repeated heading gets -1, -2, ..."""
    seen: dict[str, int] = {}
    result = set()
    for line in _prose(text).splitlines():
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def broken_links(page: Path) -> list[str]:
    """What is wrong with the relative links of one Markdown file, one message per link."""
    text = page.read_text(encoding="utf-8")
    problems = []
    for number, target in links(text):
        if _SCHEME.match(target) or target.startswith("//"):
            continue  # another site, or mailto:
        path_part, _, fragment = target.partition("#")
        where = f"{page.relative_to(ROOT)}:{number}: {target}"
        resolved = (page.parent / path_part).resolve() if path_part else page
        if not resolved.exists():
            problems.append(f"{where}: no such file {resolved.relative_to(ROOT)}")
            continue
        if (
            fragment
            and resolved.suffix == ".md"
            and fragment not in anchors(resolved.read_text(encoding="utf-8"))
        ):
            problems.append(f"{where}: no heading with the anchor #{fragment}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    assert broken_links(page) == []


def test_readme_links_every_docs_page() -> None:
    linked = {target.partition("#")[0] for _, target in links((ROOT / "README.md").read_text())}
    pages = {f"docs/{page.name}" for page in PAGES if page.parent.name == "docs"}
    assert sorted(pages - linked) == []


@pytest.mark.parametrize("page", PAGES[1:], ids=lambda p: p.name)
def test_docs_page_opens_with_who_it_is_for(page: Path) -> None:
    """A title, then a first paragraph that names its reader ("For whoever ...")."""
    lines = page.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# ")
    opening = " ".join(lines[1:12]).lower()
    assert re.search(r"\bfor (whoever|the |you|anyone)", opening), opening[:200]


def test_the_checker_finds_what_is_broken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "README.md"
    page.write_text(
        "# Title\n\n"
        "[ok](docs/a.md) [anchor](docs/a.md#twice-1) [here](#title) [web](https://x.test/nope)\n"
        "`[in code](missing.md)`\n"
        "```\n[in a fence](missing.md)\n```\n"
        "[gone](docs/b.md) [bad anchor](docs/a.md#thrice) [bad here](#nope) `a code span\n"
        "over two lines [hidden](missing.md)` [a link over\ntwo lines](docs/d.md)\n"
        "[ref]: docs/c.md\n"
    )
    problems = broken_links(page)
    assert [p.split(": ", 1)[1].split(":")[0] for p in problems] == [
        "docs/b.md",
        "docs/a.md#thrice",
        "#nope",
        "docs/d.md",
        "docs/c.md",
    ]


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("The run config", "the-run-config"),
        ("Checking a config: `vlpref check`", "checking-a-config-vlpref-check"),
        ("Outbound requests (images)", "outbound-requests-images"),
        ("vLLM: offline against server", "vllm-offline-against-server"),
        ("Answers in real-model styles, and re-asks", "answers-in-real-model-styles-and-re-asks"),
    ],
)
def test_slug_as_github_makes_it(heading: str, anchor: str) -> None:
    assert slug(heading) == anchor
