"""Every relative link and ``#anchor`` in README.md and docs/ resolves (GitHub's rules: a
link is relative to the file it is in; an anchor is its heading in lower case, punctuation
but ``-`` and ``_`` dropped, spaces as ``-``, repeats numbered ``-1``, ``-2``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+?)\s*$", FENCE.sub("", path.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "")).strip().lower().replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def links(path: Path) -> list[str]:
    return [t for t in LINK.findall(FENCE.sub("", path.read_text()))
            if not re.match(r"[a-z]+:", t)]  # fmt: skip


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_relative_links_and_anchors_resolve(doc: Path) -> None:
    broken = []
    for target in links(doc):
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        if not path.exists():
            broken.append(
                f"{target}: no file {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}"
            )
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {path.name}")
    assert not broken, broken


def test_the_checker_catches_a_broken_link_and_anchor(tmp_path: Path) -> None:
    """The guard itself: a link to a missing file and to a missing heading are found."""
    doc = tmp_path / "a.md"
    doc.write_text("# Title here\n\n[ok](#title-here) [bad](#nowhere) [gone](missing.md)\n")
    assert anchors(doc) == {"title-here"}
    assert links(doc) == ["#title-here", "#nowhere", "missing.md"]
