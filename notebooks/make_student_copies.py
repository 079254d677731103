"""Write student copies of the course notebooks: the same notebooks without their solution cells.

Every exercise of a notebook is a markdown cell tagged ``exercise`` (the task), sometimes followed by
a code cell tagged ``exercise`` (a starting point), and then one or more code cells tagged
``solution``.  A student copy keeps every cell except the solutions, in the same order, with no
outputs; where an exercise had no starting cell, an empty code cell tagged ``exercise`` takes the
solution's place, so the student has somewhere to write.  The lecture path (``README.md``) is copied
along.  Nothing in the course depends on a solution cell, so a student copy runs top to bottom.

Usage (from the repository root; ``make student-notebooks`` runs the first form)::

    python notebooks/make_student_copies.py                       # -> build/student-notebooks/
    python notebooks/make_student_copies.py --out DIR 01_the_bound.ipynb
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import nbformat

NOTEBOOK_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = NOTEBOOK_DIR.parent / "build" / "student-notebooks"
EXERCISE, SOLUTION = "exercise", "solution"
ANSWER_HERE = "# your answer here"


def tags(cell) -> set[str]:
    """The cell's metadata tags."""
    return set(cell.get("metadata", {}).get("tags", []))


def student_copy(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """``nb`` without its solution cells and outputs (a new notebook; ``nb`` is not changed)."""
    out = nbformat.from_dict(nb)  # a deep copy
    cells, n = [], 0
    for cell in out.cells:
        if SOLUTION in tags(cell):
            n += 1
            has_start = bool(cells) and cells[-1].cell_type == "code" and EXERCISE in tags(cells[-1])
            if not has_start:  # somewhere to write the answer
                blank = nbformat.v4.new_code_cell(ANSWER_HERE, metadata={"tags": [EXERCISE]})
                blank["id"] = f"{cell.get('id', 'cell')}-answer"[:64]
                cells.append(blank)
            continue
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cells.append(cell)
    out.cells = cells
    out.metadata["student_copy"] = {"solutions_removed": n}
    nbformat.validate(out)
    return out


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"folder for the copies (default {DEFAULT_OUT.relative_to(NOTEBOOK_DIR.parent)})")
    parser.add_argument("notebooks", nargs="*", help="notebook files (default: every NN_*.ipynb of notebooks/)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if out == NOTEBOOK_DIR:
        parser.error("--out must not be notebooks/ itself: the copies would replace the originals")
    paths = [Path(p) for p in args.notebooks] or sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    for p in paths:
        if not p.is_file() and (NOTEBOOK_DIR / p).is_file():
            continue
        if not p.is_file() or p.suffix != ".ipynb":
            parser.error(f"notebooks: {p} is not a notebook file (.ipynb)")
    paths = [p if p.is_file() else NOTEBOOK_DIR / p for p in paths]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for p in paths:
        nb = nbformat.read(p, as_version=4)
        copy = student_copy(nb)
        target = out / p.name
        nbformat.write(copy, target)
        written.append(target)
        print(f"{target}: {copy.metadata['student_copy']['solutions_removed']} solution cells removed")
    if (NOTEBOOK_DIR / "README.md").exists():
        shutil.copyfile(NOTEBOOK_DIR / "README.md", out / "README.md")
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
