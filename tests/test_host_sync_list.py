"""docs/distributed.md's list of host reads (``.item()``, ``float(t)``, ``bool(t)``, ``int(t)``,
``.tolist()``, ``.cpu()``) in σReparam's and the monitor's hot paths stays true: every listed
fragment is in the function the list names, every such read in a listed function is listed,
and the functions said to have none have none; every test the page cites exists."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "distributed.md"
#: a host read: .item(), .tolist(), .cpu(), or bool/float/int called on something (not .float())
READ = re.compile(r"\.item\(\)|\.tolist\(\)|\.cpu\(\)|(?<![\w.])(?:bool|float|int)\(")
ROW = re.compile(r"^\| `(sigma_core/\w+\.py):(\d+)` `([\w.]+)` \| `([^`]+)` \| (.+) \|$", re.M)
HOT_MODULES = ("sigma_core/reparam.py", "sigma_core/capture.py", "sigma_core/measure.py",
               "sigma_core/monitor.py", "sigma_core/whole_weights.py")


def functions(path: str) -> dict[str, tuple[int, int]]:
    """Qualified name (``Class.method``) -> (first, last) line of every function in ``path``."""
    out: dict[str, tuple[int, int]] = {}

    def walk(node, prefix=""):
        for ch in ast.iter_child_nodes(node):
            if isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if not isinstance(ch, ast.ClassDef):
                    out[prefix + ch.name] = (ch.lineno, ch.end_lineno)
                walk(ch, prefix + ch.name + ".")

    walk(ast.parse((ROOT / path).read_text()))
    return out


def read_lines(path: str, span: tuple[int, int]) -> dict[int, str]:
    """The lines of ``span`` in ``path`` that hold a host read (comments and doctests left out)."""
    lines = (ROOT / path).read_text().splitlines()
    found = {}
    for i in range(span[0], span[1] + 1):
        code = lines[i - 1].split("#")[0].strip()
        if not code.startswith(">>>") and READ.search(code):
            found[i] = code
    return found


def listed():
    rows = ROW.findall(PAGE.read_text())
    assert len(rows) >= 20, "the host-read table of docs/distributed.md was not found"
    return rows


def silent_functions() -> list[str]:
    text = PAGE.read_text()
    part = text.split("Functions with no host read at all", 1)[1].split("\n\n", 1)[0]
    names = re.findall(r"`([\w.]+)`", part)
    assert len(names) >= 10
    return names


def owner(name: str) -> str:
    hits = [m for m in HOT_MODULES if name in functions(m)]
    assert len(hits) == 1, f"{name}: found in {hits} (expected exactly one of {HOT_MODULES})"
    return hits[0]


def test_every_listed_fragment_is_in_the_function_named():
    for path, _, qual, fragment, _ in listed():
        spans = functions(path)
        assert qual in spans, f"{path}: no function {qual}"
        body = read_lines(path, spans[qual])
        assert any(fragment in code for code in body.values()), f"{path} {qual}: `{fragment}` not found"


def test_every_host_read_of_a_listed_function_is_listed():
    by_function: dict[tuple[str, str], list[str]] = {}
    for path, _, qual, fragment, _ in listed():
        by_function.setdefault((path, qual), []).append(fragment)
    for (path, qual), fragments in by_function.items():
        for line, code in read_lines(path, functions(path)[qual]).items():
            assert any(f in code for f in fragments), f"{path}:{line} ({qual}) not in docs/distributed.md: {code}"


def test_the_functions_said_to_have_no_host_read_have_none():
    for name in silent_functions():
        path = owner(name)
        reads = read_lines(path, functions(path)[name])
        assert not reads, f"{path} {name} has host reads not in docs/distributed.md: {reads}"


def test_every_test_the_page_cites_exists():
    cited = set(re.findall(r"(tests/test_\w+\.py)::(\w+)", PAGE.read_text()))
    assert len(cited) >= 8
    for path, name in sorted(cited):
        assert (ROOT / path).exists(), path
        assert name in functions(path), f"docs/distributed.md cites {path}::{name}, which does not exist"
