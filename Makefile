# The two set-up commands of the README: `make run` and `make test`. Each creates .venv and installs
# the project into it when pyproject.toml changed; nothing depends on what was installed by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test lint typecheck pytest bench venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	touch $(STAMP)

venv: $(STAMP)

# The bundled mock backend on :8001 and the sidecar on :8080 with config.yaml, until Ctrl-C.
run: $(STAMP)
	$(BIN)/python -m bench.demo --config config.yaml

# ruff, mypy --strict, then pytest (pytest exits 5, failing this target, when it collects no test).
test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

# The load runner: mock direct vs nginx vs the sidecar, one run, table + bench/results/<date>.md.
bench: $(STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
