# The two commands of the README: `make repro` (whole pipeline) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
export DVC_NO_ANALYTICS := 1

.PHONY: repro test install clean

install: $(VENV)/.installed

# --no-compile: pip would byte-compile every module of every package (torch's thousands: about 40 s
# on 2 cores); Python compiles the ones a stage imports on first use instead.
PIP_INSTALL := $(BIN)/pip install --no-compile

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(PIP_INSTALL) -e .
	touch $@

# The extras apart, so that `make repro` installs only what the params use: the test extras
# (pytest and its plugins), and the text family's (transformers, about 10 s) only where
# params.yaml says `modality: text` (`repsurgery preset text-world`, `paper-bert`).
$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP_INSTALL) -e '.[test]'
	touch $@

$(VENV)/.installed-text: $(VENV)/.installed
	$(PIP_INSTALL) -e '.[text]'
	touch $@

TEXT := $(shell grep -qs '^modality: *text' params.yaml && echo $(VENV)/.installed-text)

repro: install $(TEXT)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: $(VENV)/.installed-test
	REPSURGERY_QUIET=1 $(BIN)/python -m pytest -q --durations=10 -n auto --dist loadfile

# The DVC outputs that `make repro` rebuilds; results/ is committed and stays.
clean:
	rm -rf data models features
