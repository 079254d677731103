"""Rebuild the shipped training corpus from a CPython 3.11.7 standard library.

The corpus that every run trains on is ``stdlib-3.11.7.bin.xz`` beside this script: the
concatenation of the ``*.py`` files of CPython 3.11.7's standard library (third-party
``site-packages`` / ``dist-packages`` excluded), sorted by their path relative to the
library's directory (POSIX form), cut to the first 8 MiB (8 388 608 bytes), compressed with
xz.  ``manifest.json`` lists every file that contributes (relative path, bytes taken) and the
SHA-256 of the uncompressed bytes, which :func:`sigma_core.experiments.data.shipped_corpus_bytes`
checks on every load.

Usage (from the repository root)::

    python sigma_core/experiments/corpus/build_corpus.py                # this Python's stdlib
    python sigma_core/experiments/corpus/build_corpus.py --stdlib DIR   # another stdlib directory
    python sigma_core/experiments/corpus/build_corpus.py --check        # compare, write nothing

The uncompressed bytes (and so their SHA-256) are a function of the CPython version's source
only; a different Python version gives different bytes and the script says so.  The compressed
file's bytes may differ between liblzma versions, which is why the checked hash is of the
uncompressed data.  The CPython licence (PSF License Agreement and its history) is copied from
the same installation into ``LICENSE-CPython.txt``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import shutil
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
PYTHON_VERSION = "3.11.7"
SIZE = 8 * 2**20
DATA_NAME = f"stdlib-{PYTHON_VERSION}.bin.xz"
THIRD_PARTY = ("site-packages", "dist-packages")


def stdlib_files(root: Path) -> list[Path]:
    """The ``*.py`` files under ``root`` outside site-/dist-packages, sorted by relative POSIX path."""
    files = [p for p in root.rglob("*.py")
             if p.is_file() and not any(part in THIRD_PARTY for part in p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def build(root: Path, size: int = SIZE) -> tuple[bytes, dict[str, int]]:
    """The first ``size`` bytes of the sorted concatenation, and ``{relative path: bytes taken}``."""
    chunks, rows, total = [], {}, 0
    for path in stdlib_files(root):
        data = path.read_bytes()[: size - total]
        chunks.append(data)
        rows[path.relative_to(root).as_posix()] = len(data)
        total += len(data)
        if total >= size:
            break
    raw = b"".join(chunks)
    if len(raw) < size:
        raise SystemExit(f"error: {root} holds only {len(raw)} bytes of *.py source, fewer than {size}")
    return raw, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                        help="the standard library directory to read (default: this Python's)")
    parser.add_argument("--out", type=Path, default=HERE, help="where to write (default: beside this script)")
    parser.add_argument("--check", action="store_true",
                        help="only compare the rebuilt bytes with the shipped manifest's SHA-256")
    args = parser.parse_args(argv)
    if not args.stdlib.is_dir():
        parser.error(f"--stdlib is not a directory: {args.stdlib}")
    raw, rows = build(args.stdlib)
    digest = hashlib.sha256(raw).hexdigest()
    version = ".".join(map(str, sys.version_info[:3]))
    print(f"{len(rows)} files, {len(raw)} bytes, sha256 {digest} (read by Python {version})")
    shipped = HERE / "manifest.json"
    if shipped.exists():
        expected = json.loads(shipped.read_text())["sha256"]
        same = digest == expected
        print("matches the shipped corpus" if same else
              f"DIFFERS from the shipped corpus ({expected}); the shipped one is CPython {PYTHON_VERSION}'s")
        if args.check:
            return 0 if same else 1
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / DATA_NAME).write_bytes(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME))
    manifest = {
        "name": DATA_NAME,
        "source": f"CPython {PYTHON_VERSION} standard library: *.py files sorted by relative path, "
                  f"first {SIZE} bytes",
        "python_version": PYTHON_VERSION,
        "size": len(raw),
        "sha256": digest,
        "license": "PSF License Agreement for Python (LICENSE-CPython.txt)",
        "built_with": "python sigma_core/experiments/corpus/build_corpus.py",
        "n_files": len(rows),
        "files": rows,
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    licence = args.stdlib / "LICENSE.txt"
    if licence.is_file():
        shutil.copyfile(licence, args.out / "LICENSE-CPython.txt")
    else:
        print(f"warning: no LICENSE.txt in {args.stdlib}; LICENSE-CPython.txt not updated")
    print(f"wrote {args.out / DATA_NAME}, manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
