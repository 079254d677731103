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


def examples(page: Path, section: str):
    """``(title, code, shown)`` of each ``### title`` of ``## section`` on ``page`` whose ```python
    block is followed by a ```text block: the code and the output the page says it prints."""
    body = page.read_text(encoding="utf-8").split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    found = []
    for part in body.split("\n### ")[1:]:
        m = re.search(r"```python\n(.*?)```\n(?:(?!```).)*?```text\n(.*?)```", part, flags=re.S)
        if m:
            found.append((part.splitlines()[0].strip(), m.group(1), m.group(2)))
    return found


TRAINING = examples(ROOT / "docs" / "monitor.md", "In a training run")


def _printed(code: str, capsys) -> list[str]:
    exec(compile(code, "docs example", "exec"), {"__name__": "docs_example"})
    # the Hugging Face Trainer prints its own log lines (dicts): the example's lines are the others
    return [line for line in capsys.readouterr().out.splitlines() if not line.startswith("{")]


def test_each_integration_has_a_checked_example():
    assert [t for t, _, _ in TRAINING] == ["A loop of your own", "Hugging Face `Trainer`", "Lightning", "TensorBoard"]


@pytest.mark.parametrize("title, code, shown", TRAINING, ids=[t for t, _, _ in TRAINING])
def test_the_training_examples_of_docs_monitor_print_what_the_page_says(title, code, shown, capsys, tmp_path,
                                                                       monkeypatch):
    pytest.importorskip({"Hugging Face `Trainer`": "transformers", "Lightning": "lightning",
                         "TensorBoard": "tensorboard"}.get(title, "torch"))
    monkeypatch.chdir(tmp_path)  # whatever an example writes stays out of the checkout
    assert _printed(code, capsys) == shown.splitlines()


def test_the_readme_loop_logging_every_10_steps_prints_what_it_says(capsys, tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    code, shown = re.search(r"```python\n((?:(?!```).)*?every=10(?:(?!```).)*?)```\n(?:(?!```).)*?```text\n(.*?)```",
                            text, flags=re.S).groups()
    monkeypatch.chdir(tmp_path)
    assert _printed(code, capsys) == shown.splitlines()
