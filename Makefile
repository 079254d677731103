# Two commands do everything: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU wheel of torch 2.13.0 lies on disk on the project's machines; an unpinned
# `torch` would pull a multi-GB CUDA build.  Installed only if no torch is importable.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test env notebooks bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"
	touch $@

env: $(VENV)/.installed

demo: env
	$(VENV)/bin/entropy-collapse demo

test: env
	$(PY) -m pytest $(PYTEST_ARGS)

notebooks: env
	$(PIP) install -q -e ".[test,notebooks]"
	@echo "Open the notebooks with:  $(VENV)/bin/jupyter lab notebooks/"

bench: env
	$(PY) benchmarks/bench_bound.py
	$(PY) benchmarks/bench_reparam.py
	$(PY) benchmarks/bench_entropy.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
