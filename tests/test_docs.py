"""The README and docs/ pages: every relative link resolves, every #anchor exists, and nothing
points at material a user of the repository does not have."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
         ROOT / "sigma_core" / "experiments" / "corpus" / "README.md"]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"[`*_]", lambda m: "_" if m.group() == "_" else "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


def links(page: Path):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in LINK.findall(text):
        if not re.match(r"[a-z]+:", target):  # skip https:, mailto:
            yield target


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page):
    missing = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            missing.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            missing.append(f"{target} (no such heading)")
    assert not missing, f"{page.relative_to(ROOT)}: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_cite_only_what_a_user_has(page):
    text = page.read_text()
    for internal in ("CALIBRATION", "THEORY.md", "../shared", "shared/"):
        assert internal not in text, f"{page.relative_to(ROOT)} mentions {internal}"


def test_slug_matches_github():
    assert slug("Why the collapsed baseline shows fewer tokens/s than σReparam") == \
        "why-the-collapsed-baseline-shows-fewer-tokenss-than-σreparam"
    assert slug("σReparam's cost (`benchmarks/bench_reparam.py`)") == "σreparams-cost-benchmarksbench_reparampy"
