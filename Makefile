# Two commands from a fresh clone: `make run` and `make test`.
PYTHON ?= python3.11
# The suite in this many processes, each with its own deployment (database, queues, API, workers).
TEST_PROCESSES ?= 2
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH_VERSION := 2.13.0

.PHONY: install run test test-fast lint train-demo clean

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch first: on a machine without an NVIDIA GPU take the CPU build, so resolving the rest never
# pulls a multi-GB CUDA build. The repository names no package index. A CPU wheel pip finds without
# an index (its configured find-links, e.g. a local wheelhouse) wins; else TORCH_INDEX_URL, an index
# with CPU builds of torch (README, "Development"), next to pip's configured indexes (the `+cpu`
# build sorts above the plain one); else pip's configured indexes alone, and on Linux that is the
# CUDA build: it works, only larger.
TORCH_INDEX_URL ?=
$(VENV)/.installed: pyproject.toml | $(PY)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PY) -m pip install --quiet torch==$(TORCH_VERSION); \
	elif $(PY) -m pip install --quiet --no-index --no-deps torch==$(TORCH_VERSION) 2>/dev/null; then \
		$(PY) -m pip install --quiet torch==$(TORCH_VERSION); \
	elif [ -n "$(TORCH_INDEX_URL)" ]; then \
		$(PY) -m pip install --quiet torch==$(TORCH_VERSION) --extra-index-url "$(TORCH_INDEX_URL)"; \
	else \
		echo "no CPU build of torch $(TORCH_VERSION) without an index, and TORCH_INDEX_URL is not set:"; \
		echo "installing torch from pip's configured indexes (on Linux, the CUDA build)"; \
		$(PY) -m pip install --quiet torch==$(TORCH_VERSION); \
	fi
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

# The service on the embedded default: SQLite, local storage, a local queue and one worker, all
# under ~/.qlora (QLORA_HOME). The first start creates a team, prints its key and builds the demo model.
run: install
	$(VENV)/bin/qlora serve

# The engine alone, no service: trains the demo task on the tiny model into demo/run. Its data and
# spec go to demo/engine/, so demo/spec.json (the service walk-through's, base_model tiny-demo) stays.
train-demo: install
	$(VENV)/bin/qlora tiny-model demo/tiny-model
	$(VENV)/bin/qlora demo-data demo/engine --base-model demo/tiny-model
	$(VENV)/bin/qlora train demo/engine/spec.json --data demo/engine/train.jsonl \
		--validation demo/engine/validation.jsonl --out demo/run

# The whole suite, after the lint. The tests start Postgres, Redis and an S3 server on loopback when
# they are not running. The slowest tests are listed at the end, to keep the whole within its budget.
# Two processes, a test file each at a time (its module fixtures stay in one): much of a service test is
# waiting (a process starting, a deadline passing, a poll) and one-threaded imports, which the other
# process fills. One torch thread each: OpenMP's spinning threads, two per process on two cores, would
# starve each other (measured: slower than one process).
test: install lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_PROCESSES) --dist loadfile --durations=25

# Style (ruff), the direction of imports between app/ and worker/ (import-linter's contracts in
# pyproject.toml) and types (mypy over the API and the contract it shares with the engine).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

# The rules that need no deployment (state machine, job requests, admission, OpenAI translation) on
# SQLite, in seconds: no Postgres, Redis, S3 or training.
test-fast: install
	$(PY) -m pytest tests/fast -q

clean:
	rm -rf $(VENV) demo
