# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing and
# install the package with the tested CPU versions (constraints/cpu.txt) plus the offline assets;
# a stamp file keeps later calls fast.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ray-fedit-installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt constraints/assets.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints/cpu.txt -e '.[dev]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r constraints/assets.txt
	@touch $@

demo: setup
	$(VENV)/bin/ray-fedit run configs/quickstart.yaml

lint: setup
	$(VENV)/bin/ruff check ray_fedit tests benchmarks

test: setup lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q tests/unit

bench: setup
	$(PY) benchmarks/aggregation.py --quick
	$(PY) benchmarks/generation.py
	$(PY) benchmarks/federation_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
