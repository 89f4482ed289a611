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

# The extras apart, so that `make repro` installs only what the params use: the test extras
# (pytest and its plugins), and the text family's (transformers, about 10 s) only where
# params.yaml says `modality: text` (`repsurgery preset text-world`, `paper-bert`).
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -e '.[test]'
	touch $@

$(VENV)/.installed-text: $(VENV)/.installed
	$(BIN)/pip install -e '.[text]'
	touch $@

TEXT := $(shell grep -qs '^modality: *text' params.yaml && echo $(VENV)/.installed-text)

repro: install $(TEXT)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: $(VENV)/.installed-test
	REPSURGERY_QUIET=1 $(BIN)/python -m pytest -q --durations=10 -n auto --dist loadfile

# The DVC outputs that `make repro` rebuilds; results/ is committed and stays.
clean:
	rm -rf data models features
