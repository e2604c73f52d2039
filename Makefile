# Two commands: `make run` starts the server on the bundled model, `make test` runs
# every check. Both create .venv on first use and reinstall when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	# Silero VAD's ONNX model (vad.detector: silero) without the torch it declares.
	$(BIN)/pip install --quiet --no-deps silero-vad==6.2.3
	touch $@

# The tests run both engines, so the test install has the torch extra (a CPU wheel).
$(BIN)/.installed-test: $(BIN)/.installed pyproject.toml
	$(BIN)/pip install --quiet -e '.[test,torch]'
	touch $@

run: $(BIN)/.installed
	$(BIN)/whisperstream serve $(ARGS)

lint: $(BIN)/.installed-test
	$(BIN)/ruff check streaming server client tests
	$(BIN)/ruff format --check streaming server client tests
	$(BIN)/mypy

# The coverage report and its floor (set at what the suite reached: 90 % on 2026-12-01);
# `make test PYTEST_ARGS="tests/test_x.py" COVERAGE=` runs a part without them.
COVERAGE ?= --cov=streaming --cov=server --cov=client --cov-report=term:skip-covered \
	--cov-fail-under=88

test: lint
	$(BIN)/python -m pytest $(COVERAGE) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) tests/.cache
