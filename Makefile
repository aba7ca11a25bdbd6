# The two commands: `make demo` and `make test`. Both run set-up first (idempotent).
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test unit integration bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/propolis demo

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

unit: setup
	$(PY) -m pytest -q tests services $(PYTEST_ARGS)

integration: setup
	$(PY) -m pytest -q integration $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/propolis bench bus

clean:
	-$(VENV)/bin/propolis sandbox down --all 2>/dev/null
	rm -rf $(VENV) .pytest_cache
