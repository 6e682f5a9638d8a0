# The README's two commands are `make train` and `make test`; both install what they need.
PYTHON ?= python3
WORKDIR ?= workdirs/ddpm

.PHONY: setup train test check lint

setup:
	bash .ci/setup

train: setup
	$(PYTHON) -m diffax_lab.main --config=configs/ddpm.py --workdir=$(WORKDIR)

test:
	bash .ci/setup --test
	$(MAKE) check

# Lint, format check and the test suite (what CI runs after setup).
check: lint
	$(PYTHON) -m pytest -q -n 2 --durations=25 tests

lint:
	ruff check .
	ruff format --check .
