# The two commands of the README: `make repro` (whole pipeline) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
export DVC_NO_ANALYTICS := 1

.PHONY: repro test install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e .
	touch $@

# The test extras apart (pytest and its plugins), so that `make repro` installs only the pipeline.
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -e '.[test]'
	touch $@

repro: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: $(VENV)/.installed-test
	REPSURGERY_QUIET=1 $(BIN)/python -m pytest -q --durations=10 -n auto --dist loadfile

# The DVC outputs that `make repro` rebuilds; results/ is committed and stays.
clean:
	rm -rf data models features
