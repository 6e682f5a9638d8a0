# The README's two commands are `make train` and `make test`; both install what they need
# into a project-local virtual environment (.venv, made here unless one is active), so they
# never touch or depend on the system Python.
ifdef VIRTUAL_ENV
PYTHON ?= $(VIRTUAL_ENV)/bin/python
else
PYTHON ?= $(CURDIR)/.venv/bin/python
endif
WORKDIR ?= workdirs/ddpm
CONFIG ?= configs/ddpm.py

.PHONY: setup setup-test train test test-fast check lint notebooks

$(CURDIR)/.venv/bin/python:
	python3 -m venv $(CURDIR)/.venv

setup: $(PYTHON)
	PYTHON=$(PYTHON) bash .ci/setup

setup-test: $(PYTHON)
	PYTHON=$(PYTHON) bash .ci/setup --test

train: setup
	$(PYTHON) -m diffax_lab.main --config=$(CONFIG) --workdir=$(WORKDIR)

test: setup-test
	$(MAKE) check

# The edit loop: everything but the end-to-end runs (under 3 minutes on 2 cores).
test-fast: lint
	$(PYTHON) -m pytest -q -n 2 -m "not slow" tests

# Lint, format check, the layers contract and the test suite (what CI runs after setup).
check: lint
	$(PYTHON) -m pytest -q -n 2 --dist worksteal --durations=25 tests

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -c "from importlinter.cli import lint_imports_command as l; l()"

# Notebooks (notebooks/NN_*.py, jupytext py:percent): each converted to .ipynb, executed by
# papermill in a Jupyter kernel at its full-size defaults (or NB_PARAMS, e.g.
# NB_PARAMS='-p small True'), rendered to docs/notebooks/NAME.md + NAME_files/*.png.
# One notebook: make notebooks NOTEBOOKS=notebooks/01_forward_process.py
NOTEBOOKS ?= $(wildcard notebooks/[0-9][0-9]_*.py)
NB_PARAMS ?=
NB_BUILD ?= build/notebooks
notebooks:
	mkdir -p $(NB_BUILD) docs/notebooks
	set -e; for nb in $(NOTEBOOKS); do \
	  name=$$(basename $$nb .py); \
	  $(PYTHON) -m jupytext --to ipynb --output $(NB_BUILD)/$$name.ipynb $$nb; \
	  $(PYTHON) -m papermill --cwd $(CURDIR) $(NB_PARAMS) $(NB_BUILD)/$$name.ipynb $(NB_BUILD)/$$name.run.ipynb; \
	  $(PYTHON) -m benchmarks.terminal_streams $(NB_BUILD)/$$name.run.ipynb; \
	  $(PYTHON) -m jupyter nbconvert --to markdown --output-dir docs/notebooks --output $$name $(NB_BUILD)/$$name.run.ipynb; \
	done
	$(PYTHON) -m ruff format docs/notebooks  # the rendered code blocks, as `make lint` checks them
