"""`theory` is pure mathematics: importing it (all of it) must never import torch."""
import pkgutil
import subprocess
import sys

import theory


def test_theory_never_imports_torch():
    modules = ["theory"] + [
        f"theory.{m.name}" for m in pkgutil.iter_modules(theory.__path__) if not m.name.startswith("_")
    ]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad\n"
        "print(len(sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert len(modules) >= 1
