# Two commands do everything: `make demo` (install + the whole run on MovieLens-100k) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/ml100k-cpu.yaml

.PHONY: setup demo test lint clean-venv

$(VENV)/.installed: requirements/cpu.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-deps -r requirements/cpu.lock
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/rlrf4rec run --config $(CONFIG)

test: setup
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q --durations=15 tests

lint: setup
	$(VENV)/bin/ruff check rlrf4rec ray_jobs tests benchmarks

clean-venv:
	rm -rf $(VENV)
