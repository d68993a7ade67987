# Two commands do everything: `make demo` (install + the whole run on MovieLens-100k) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/ml100k-cpu.yaml
RUN_ARGS ?=  # e.g. RUN_ARGS=--tracking=mlflow: the run mirrored into MLflow at the end (<run>/mlruns)

.PHONY: setup demo science test lint clean-venv

$(VENV)/.installed: requirements/cpu.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-deps -r requirements/cpu.lock
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/rlrf4rec run --config $(CONFIG) $(RUN_ARGS)

# The decisive experiment (configs/ml100k-cpu-science.yaml; under 2 hours on a 2-core box): DPO, random-label DPO
# and SFT-on-best from the same pairs (every best-vs-worst pair of the 500 users), judged by reward-model seeds that built no pair and by test NDCG@5.
SCIENCE := configs/ml100k-cpu-science.yaml
science: setup
	$(VENV)/bin/rlrf4rec data --config $(SCIENCE)
	$(VENV)/bin/rlrf4rec arms --config $(SCIENCE) --pairs all --flips 0.5 --sft-best all --name science

# Two pytest workers (pytest-xdist), each taking whole test files (a module's Ray head or cluster stays in one
# worker): most tests wait on Ray's start-up and controllers, or train on one thread, so two share a 2-core box well.
test: setup
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests

lint: setup
	$(VENV)/bin/ruff check rlrf4rec ray_jobs tests benchmarks

clean-venv:
	rm -rf $(VENV)
