# Two commands for a fresh machine with Python 3.11, make and git:
#   make demo   set up .venv and run the whole pipeline (dvc repro) on the embedded synthetic dataset
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Stage commands call `python`: put the venv first on PATH for dvc and everything it starts.
RUN := PATH="$(CURDIR)/$(BIN):$$PATH"

.PHONY: setup demo test test-fast lint bench clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install --disable-pip-version-check --no-deps -e .
	touch $@

demo: setup
	$(RUN) dvc repro

test: setup
	$(RUN) pytest

test-fast: setup
	$(RUN) pytest -m "not slow"

lint: setup
	$(BIN)/ruff check .

# Every benchmark prints its figures and a ratio against a baseline measured in the same run.
# bench-inference needs a trained model: run `make demo` first.
bench: setup
	$(RUN) python -m cellseg.bench.prepare
	$(RUN) python -m cellseg.bench.maps
	$(RUN) python -m cellseg.bench.metric
	$(RUN) python -m cellseg.bench.aux
	$(RUN) python -m cellseg.bench.postproc
	$(RUN) python -m cellseg.bench.inference models/best.pt

clean-venv:
	rm -rf $(VENV)
