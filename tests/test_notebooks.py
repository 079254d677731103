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
)
#: per-cell limit; a smoke-mode notebook takes well under two minutes in all on 2 cores
CELL_TIMEOUT_S = 300


def _ids(paths):
    return [p.stem for p in paths]


def test_every_lesson_is_there():
    """The five lessons of the course exist, and nothing else is numbered like one."""
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
