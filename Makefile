# Two commands do everything: `make demo` and `make test` (see README.md and docs/install.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is installed first, only if the venv has none.  On Linux an unqualified `pip install torch`
# pulls a multi-GB CUDA build; for the CPU-only wheel (about 200 MB) use PyTorch's CPU index:
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
# TORCH_SPEC chooses the version (the project is tested with torch 2.13.0; it supports >= 2.11).
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
# pytest-xdist, one worker per core: the suite takes about 8 minutes on 2 cores this way (serially about
# 14); `make test PYTEST_ARGS=` runs it in one process
PYTEST_ARGS ?= -n auto
# `make results` regenerates the committed results/ from a clean checkout (see docs/running.md)
STAGE  ?= runs/results-staging

.PHONY: demo test env notebooks student-notebooks bench results ledger clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
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

# The course notebooks without their solution cells (tagged `solution`), for students.
STUDENT_DIR ?= build/student-notebooks
student-notebooks:
	$(PY) notebooks/make_student_copies.py --out $(STUDENT_DIR)

bench: env
	$(PY) benchmarks/bench_bound.py
	$(PY) benchmarks/bench_reparam.py
	$(PY) benchmarks/bench_entropy.py
	$(PY) benchmarks/bench_collapsed_step.py

# results/cpu-demo and results/compare-cpu, from the committed code only: refuses a checkout whose
# tracked files differ from HEAD, trains into $(STAGE) (outside results/, so the tree stays clean
# while it runs), then replaces the two folders.  About 10 minutes on 2 CPU cores; commit after.
results: env
	@git diff --quiet HEAD -- || { echo "make results: tracked files differ from HEAD; commit or stash them first" >&2; exit 1; }
	rm -rf $(STAGE)
	start=$$(date +%s); $(VENV)/bin/entropy-collapse demo --out $(STAGE)/cpu-demo --preset cpu-demo \
	  && echo "make results: the demo took $$(( $$(date +%s) - start )) s of wall-clock time"
	$(VENV)/bin/entropy-collapse compare --out $(STAGE)/compare-cpu --preset cpu-compare --seeds 0 1 2 --jobs 2 --threads 1
	rm -rf results/cpu-demo results/compare-cpu
	mkdir -p results
	find $(STAGE) -name '*.pt' -delete
	find $(STAGE)/compare-cpu/runs -name '*.npz' -delete   # per-run samples: 3.5 MB, not needed by runs.csv
	mv $(STAGE)/cpu-demo $(STAGE)/compare-cpu results/
	$(PY) -m sigma_core.experiments.claims run --out $(STAGE)/claims --jobs 2   # claims 1-4: ViT, seq2seq, GPT (see docs/claims.md for the wall time)
	mkdir -p results/claims
	for part in vit seq2seq gpt; do rm -rf results/claims/$$part && mv $(STAGE)/claims/$$part results/claims/; done
	mv $(STAGE)/claims/run_meta.json results/claims/   # the record of this one invocation: the runs it replaces go with theirs
	$(PY) -m sigma_core.experiments.claims ledger   # docs/claims.md and results/claims/figures
	@echo "results/ regenerated from $$(git rev-parse --short HEAD); review with git status, then commit"

# the claims ledger docs/claims.md (and its figures) from the committed results/claims runs, after
# re-deriving the sweep's tables (results/compare-cpu) from its committed runs under definitions.py
ledger: env
	$(PY) -m sigma_core.experiments.compare rederive results/compare-cpu
	$(PY) -m sigma_core.experiments.claims ledger

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
