"""The shipped training corpus: the same bytes on every machine, checked at load, with its licence."""
from __future__ import annotations

import hashlib
import json
import lzma
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from sigma_core.experiments import data
from sigma_core.experiments.data import (CORPUS_SHA256, CORPUS_SIZE, CorpusError, load_corpus,
                                         load_stdlib_corpus, shipped_corpus_bytes)

ROOT = Path(__file__).resolve().parents[1]
CORPUS_DIR = ROOT / "sigma_core" / "experiments" / "corpus"


@pytest.fixture
def fresh_cache():
    """Clear the load cache before and after, so a test sees the file as it is on disk."""
    shipped_corpus_bytes.cache_clear()
    yield
    shipped_corpus_bytes.cache_clear()


def as_bytes(corpus) -> bytes:
    return bytes(torch.cat([corpus.train, corpus.val]).numpy().tobytes())


def test_shipped_file_is_the_pinned_bytes_independently_of_the_loader():
    # decompress and hash with the standard library alone, not through sigma_core
    raw = lzma.decompress((CORPUS_DIR / data.CORPUS_FILE).read_bytes())
    assert len(raw) == CORPUS_SIZE == 8_388_608
    assert hashlib.sha256(raw).hexdigest() == CORPUS_SHA256
    manifest = json.loads((CORPUS_DIR / "manifest.json").read_text())
    assert manifest["sha256"] == CORPUS_SHA256 and manifest["size"] == CORPUS_SIZE
    assert sum(manifest["files"].values()) == CORPUS_SIZE == manifest["size"]
    assert manifest["n_files"] == len(manifest["files"]) == 702
    assert list(manifest["files"]) == sorted(manifest["files"])  # sorted by relative path
    assert all(name.endswith(".py") and not name.startswith("/") and "site-packages" not in name
               for name in manifest["files"])


def test_licence_ships_beside_the_data():
    licence = (CORPUS_DIR / "LICENSE-CPython.txt").read_text()
    assert "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2" in licence
    assert "LICENSE-CPython.txt" in json.loads((CORPUS_DIR / "manifest.json").read_text())["license"]


def test_load_gives_prefixes_of_the_shipped_bytes_with_their_hash(fresh_cache):
    raw = lzma.decompress((CORPUS_DIR / data.CORPUS_FILE).read_bytes())
    for n in (2, 4096, 50_000, 2**20, CORPUS_SIZE):
        corpus = load_corpus(n, val_fraction=0.2)
        assert as_bytes(corpus) == raw[:n]
        assert corpus.sha256 == hashlib.sha256(raw[:n]).hexdigest()
        assert corpus.val.numel() == max(1, round(0.2 * n))
    # the historical name is the same function
    assert as_bytes(load_stdlib_corpus(50_000)) == raw[:50_000]
    # the file count follows the manifest: the 1 MiB prefix (cpu-smoke) touches 49 files
    assert load_corpus(2**20).n_files == 49 and load_corpus(CORPUS_SIZE).n_files == 702


def test_the_local_python_does_not_change_the_data(monkeypatch, tmp_path, fresh_cache):
    before = load_corpus(100_000)
    # point the standard library somewhere empty: the old loader would have failed or changed
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {"stdlib": str(tmp_path)})
    shipped_corpus_bytes.cache_clear()
    after = load_corpus(100_000)
    assert after.sha256 == before.sha256 and as_bytes(after) == as_bytes(before)


def test_same_bytes_in_a_fresh_interpreter_whatever_its_working_directory(tmp_path):
    code = ("from sigma_core.experiments.data import load_corpus;"
            "c = load_corpus(); print(c.sha256, c.size)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert out.stdout.split() == [CORPUS_SHA256, str(CORPUS_SIZE)]


def test_describe_records_no_path_of_this_machine():
    record = load_corpus(4096).describe()
    for value in record.values():
        if isinstance(value, str):
            assert not value.startswith("/") and sysconfig.get_paths()["stdlib"] not in value
            assert str(Path.home()) not in value and str(ROOT) not in value
    assert record["full_corpus_sha256"] == CORPUS_SHA256 and record["size"] == 4096


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing", "other-data"])
def test_a_damaged_corpus_is_refused_with_a_clear_error(damage, monkeypatch, tmp_path, fresh_cache):
    fake = tmp_path / "corpus"
    shutil.copytree(CORPUS_DIR, fake)
    target = fake / data.CORPUS_FILE
    blob = bytearray(target.read_bytes())
    if damage == "flip":
        blob[len(blob) // 2] ^= 0xFF
        target.write_bytes(bytes(blob))
    elif damage == "truncate":
        target.write_bytes(bytes(blob[: len(blob) // 2]))
    elif damage == "missing":
        target.unlink()
    else:  # valid xz holding other bytes of the right length
        target.write_bytes(lzma.compress(b"x" * CORPUS_SIZE))
    monkeypatch.setattr(data, "CORPUS_DIR", fake)
    with pytest.raises(CorpusError, match=r"training corpus .*stdlib-3\.11\.7\.bin\.xz.*reinstall"):
        load_corpus(4096)
    with pytest.raises(CorpusError):  # the old name refuses too
        load_stdlib_corpus(4096)


def test_bad_arguments_are_named(fresh_cache):
    for bad in (1, CORPUS_SIZE + 1, 2.5, True, "8"):
        with pytest.raises(ValueError, match="max_bytes"):
            load_corpus(bad)
    for bad in (0.0, 1.0, -0.1, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="val_fraction"):
            load_corpus(4096, bad)


def _build_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("build_corpus", CORPUS_DIR / "build_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_script_sorts_by_relative_path_skips_third_party_and_cuts(tmp_path):
    build = _build_module()
    files = {"b.py": b"bbbb", "a/z.py": b"zz", "a.py": b"aaa", "notes.txt": b"??",
             "a/site-packages/pkg.py": b"SITE", "b/dist-packages/m.py": b"DIST", "c.py": b"cccccc"}
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    raw, rows = build.build(tmp_path, size=12)
    assert raw == b"aaa" + b"zz" + b"bbbb" + b"ccc"  # "a.py" < "a/z.py" < "b.py" < "c.py"
    assert rows == {"a.py": 3, "a/z.py": 2, "b.py": 4, "c.py": 3}
    with pytest.raises(SystemExit, match="fewer than"):
        build.build(tmp_path, size=10**6)


@pytest.mark.skipif(sys.version_info[:3] != (3, 11, 7), reason="the shipped bytes are CPython 3.11.7's")
def test_rebuild_from_this_python_reproduces_the_shipped_bytes(tmp_path):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if not (stdlib / "logging" / "handlers.py").is_file():
        pytest.skip("this Python's standard library is incomplete")
    out = subprocess.run([sys.executable, str(CORPUS_DIR / "build_corpus.py"), "--check"],
                         capture_output=True, text=True)
    if out.returncode:  # a distribution's patched stdlib may differ: say how, then skip
        pytest.skip(f"this 3.11.7 standard library differs from the snapshot: {out.stdout.strip()}")
    assert "matches the shipped corpus" in out.stdout


def test_the_corpus_is_package_data_so_it_installs():
    import fnmatch
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["sigma_core.experiments"]
    shipped = [p.relative_to(CORPUS_DIR.parent).as_posix() for p in CORPUS_DIR.iterdir() if p.is_file()]
    for name in (f"corpus/{data.CORPUS_FILE}", "corpus/manifest.json", "corpus/LICENSE-CPython.txt"):
        assert name in shipped and any(fnmatch.fnmatch(name, pat) for pat in patterns), name
