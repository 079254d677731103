"""The teaching notebooks run top to bottom, and the claims they assert hold.

Every notebook in ``notebooks/`` ends with a cell of ``assert`` statements restating what it
taught (the bound holds, the construction is tight, the layer folds exactly, ...). Here each
notebook is executed with nbclient, in the kernel named ``python3`` (ipykernel's kernel spec in
the venv; jupyter_client launches its ``python`` with ``sys.executable``, i.e. the interpreter
running pytest), with the working directory set to ``notebooks/`` and with
``ENTROPY_COLLAPSE_SMOKE=1`` in the environment, which the first code cell of every notebook
reads to shrink its sizes. A failing assertion, or any exception, fails the test and shows the
cell's traceback.

A second test keeps the committed notebooks clean: no outputs and no execution counts, so a
diff shows only what a person wrote.

The course: every lesson has at least two exercises (markdown cells tagged ``exercise``) with
solutions (code cells tagged ``solution``, which assert their answer and run here with the rest);
``make student-notebooks`` writes copies without the solutions, which must still run. Sliders
(``controls(...)``) fall back to one plain call without a widget front-end, as here. The
``classroom`` preset meets its numbers through the real command line.
"""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
EXPECTED = (
    "01_the_bound.ipynb",
    "02_tightness_and_looseness.ipynb",
    "03_sigma_reparam_mechanics.ipynb",
    "04_entropy_collapse_live.ipynb",
    "05_reading_the_gpu_run.ipynb",
    "06_claims_ledger.ipynb",
)
#: per-cell limit; a smoke-mode notebook takes well under two minutes in all on 2 cores
CELL_TIMEOUT_S = 300


def _ids(paths):
    return [p.stem for p in paths]


def test_every_lesson_is_there():
    """The lessons of the course exist, and nothing else is numbered like one."""
    assert tuple(p.name for p in NOTEBOOKS) == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_committed_clean(path):
    """Valid nbformat 4, no outputs, no execution counts, ends by asserting its claims."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code cell"
    for i, cell in enumerate(code):
        assert cell.get("outputs") == [], f"{path.name}: code cell {i} carries outputs"
        assert cell.get("execution_count") is None, f"{path.name}: code cell {i} has a count"
    assert "ENTROPY_COLLAPSE_SMOKE" in code[0].source, (
        f"{path.name}: the first code cell must read ENTROPY_COLLAPSE_SMOKE")
    assert "assert " in code[-1].source, f"{path.name}: the last code cell must assert claims"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_executes_and_its_claims_hold(path, monkeypatch):
    """Run the notebook in smoke mode; any failed assert or error in a cell fails here."""
    monkeypatch.setenv("ENTROPY_COLLAPSE_SMOKE", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(path, as_version=4)
    # an extra cell, in memory only: which interpreter did the kernel run?
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},  # the kernel's cwd
    )
    client.execute()
    kernel_python = nb.cells[-1].outputs[0]["text"].strip()
    assert kernel_python == sys.executable, "the kernel must be the interpreter running pytest"
    if any("controls(" in c.source for c in nb.cells if c.cell_type == "code" and "def controls(" not in c.source):
        printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
        assert "plain parameters" in printed, "a control did not fall back to its plain call"


#: the course of notebooks/README.md (exercises, solutions, student copies); notebooks numbered after
#: it are not lessons and need no exercises
LESSONS = [p for p in NOTEBOOKS if p.name[:2] in {"01", "02", "03", "04", "05"}]


def _tags(cell):
    return set(cell.get("metadata", {}).get("tags", []))


@pytest.mark.parametrize("path", LESSONS, ids=_ids(LESSONS))
def test_lesson_has_exercises_with_asserted_solutions(path):
    nb = nbformat.read(path, as_version=4)
    tasks = [c for c in nb.cells if c.cell_type == "markdown" and "exercise" in _tags(c)]
    solutions = [i for i, c in enumerate(nb.cells) if "solution" in _tags(c)]
    assert len(tasks) >= 2 and len(solutions) >= 2, f"{path.name}: fewer than two exercises with solutions"
    for i in solutions:
        cell = nb.cells[i]
        assert cell.cell_type == "code" and "assert " in cell.source, f"{path.name}: solution {i} asserts nothing"
        before = nb.cells[i - 1]  # the task, or its starting cell, comes right before the solution
        assert "exercise" in _tags(before) or "solution" in _tags(before), f"{path.name}: orphan solution {i}"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "solution" not in _tags(code[-1]), "the closing assert cell must not be a solution"
    assert "arxiv.org/abs/2303.06296" in nb.cells[0].source and "README.md" in nb.cells[0].source


def _student_copies(out):
    sys.path.insert(0, str(NOTEBOOK_DIR))
    try:
        import make_student_copies
    finally:
        sys.path.remove(str(NOTEBOOK_DIR))
    return make_student_copies, make_student_copies.main(["--out", str(out), *map(str, LESSONS)])


def test_student_copies_drop_the_solutions_and_keep_everything_else(tmp_path):
    tool, written = _student_copies(tmp_path)
    assert [p.name for p in written] == [p.name for p in LESSONS]
    assert (tmp_path / "README.md").read_text() == (NOTEBOOK_DIR / "README.md").read_text()
    for original, copy in zip(LESSONS, written):
        nb, st = nbformat.read(original, as_version=4), nbformat.read(copy, as_version=4)
        nbformat.validate(st)
        assert not [c for c in st.cells if "solution" in _tags(c)]
        kept = [c.source for c in nb.cells if "solution" not in _tags(c)]
        assert [c.source for c in st.cells if c.source != tool.ANSWER_HERE] == kept
        # every exercise still has a code cell to write in, right after it
        for i, c in enumerate(st.cells):
            if c.cell_type == "markdown" and "exercise" in _tags(c):
                assert st.cells[i + 1].cell_type == "code" and "exercise" in _tags(st.cells[i + 1])
        assert all(c.outputs == [] for c in st.cells if c.cell_type == "code")
    with pytest.raises(SystemExit) as err:
        tool.main(["--out", str(NOTEBOOK_DIR)])
    assert err.value.code == 2
    with pytest.raises(SystemExit) as err:
        tool.main(["--out", str(tmp_path), str(tmp_path / "missing.ipynb")])
    assert err.value.code == 2


def test_make_student_notebooks_writes_the_copies(tmp_path):
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = tmp_path / "students"
    subprocess.run(["make", "-s", "student-notebooks", f"STUDENT_DIR={out}", f"PY={sys.executable}"],
                   cwd=NOTEBOOK_DIR.parent, check=True, capture_output=True, text=True)
    for lesson in LESSONS:
        st = nbformat.read(out / lesson.name, as_version=4)
        assert st.cells and not [c for c in st.cells if "solution" in _tags(c)]


#: the student copies executed here (notebook 4's pair is executed once already, with its solutions)
STUDENT_RUNS = [p for p in LESSONS if not p.name.startswith("04_")]


@pytest.mark.slow
@pytest.mark.parametrize("path", STUDENT_RUNS, ids=_ids(STUDENT_RUNS))
def test_student_copy_runs_without_its_solutions(path, tmp_path, monkeypatch):
    monkeypatch.setenv("ENTROPY_COLLAPSE_SMOKE", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    _, _ = _student_copies(tmp_path)
    nb = nbformat.read(tmp_path / path.name, as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                   resources={"metadata": {"path": str(NOTEBOOK_DIR)}}).execute()


@pytest.mark.slow
def test_classroom_pair_meets_its_numbers(tmp_path):
    """``entropy-collapse train --preset classroom``: some baseline head below 0.1 nats, every
    sigmaReparam head above 1 nat (summary.json's entropy_min_head), no bound violation."""
    import json

    from sigma_core.cli import main

    summaries = {}
    for reparam in ("none", "sigma"):
        out = tmp_path / reparam
        assert main(["train", "--preset", "classroom", "--reparam", reparam, "--out", str(out),
                     "--no-progress"]) in (0, None)
        summaries[reparam] = json.loads((out / "summary.json").read_text())
    assert summaries["none"]["entropy_min_head"] < 0.1, summaries["none"]
    assert summaries["sigma"]["entropy_min_head"] > 1.0, summaries["sigma"]
    assert summaries["none"]["bound_violations"] == 0 and summaries["sigma"]["bound_violations"] == 0
    assert not summaries["none"]["diverged"] and not summaries["sigma"]["diverged"]
