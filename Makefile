# Two commands set everything up: `make demo` and `make test`. Both create .venv and
# install what they need; a stamp file makes the install idempotent.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fogline-installed
DISTS := shared edge cloud firmware-sim
INSTALL_INPUTS := constraints-dev.txt requirements-dev.txt $(foreach d,$(DISTS),$(d)/pyproject.toml)

.PHONY: demo test lint typecheck imports pytest install clean

install: $(STAMP)

$(STAMP): $(INSTALL_INPUTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints-dev.txt -r requirements-dev.txt \
		$(foreach d,$(DISTS),-e ./$(d))
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

imports: $(STAMP)
	$(BIN)/lint-imports

pytest: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint typecheck imports pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
