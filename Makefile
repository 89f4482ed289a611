# The two commands of the README: `make repro` (whole pipeline) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
export DVC_NO_ANALYTICS := 1

.PHONY: repro test install clean

install: $(VENV)/.installed

# pip byte-compiles every installed module on one core (torch's thousands: about 40 s); compileall
# does the same on every core, about twice as fast. Compiled they must be: where Python writes no
# bytecode (PYTHONDONTWRITEBYTECODE), each stage would compile what it imports again.
PIP_INSTALL := $(BIN)/pip install --no-compile
COMPILE := $(BIN)/python -m compileall -qq -j0 $(VENV)/lib || true

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(PIP_INSTALL) -e .
	$(COMPILE)
	touch $@

# The extras apart, so that `make repro` installs only what the params use: the test extras
# (pytest and its plugins), and the text family's (transformers, about 10 s) only where
# params.yaml says `modality: text` (`repsurgery preset text-world`, `paper-bert`).
$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP_INSTALL) -e '.[test]'
	$(COMPILE)
	touch $@

$(VENV)/.installed-text: $(VENV)/.installed
	$(PIP_INSTALL) -e '.[text]'
	$(COMPILE)
	touch $@

TEXT := $(shell grep -qs '^modality: *text' params.yaml && echo $(VENV)/.installed-text)

repro: install $(TEXT)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: $(VENV)/.installed-test
	REPSURGERY_QUIET=1 $(BIN)/python -m pytest -q --durations=10 -n auto --dist loadfile

# The DVC outputs that `make repro` rebuilds; results/ is committed and stays.
clean:
	rm -rf data models features
