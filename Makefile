# Two entry points: `make train` and `make test`. Each installs what it needs first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
ARGS ?=

.PHONY: setup data train test imports

setup:
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[test]' --config-settings editable_mode=compat

data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; fi; fi

train: setup data
	$(PYTHON) launch.py train $(ARGS)

test: setup
	$(PYTHON) -m pytest -q -n auto --dist worksteal

# every import in the checkout resolves at its path for static tools (CI runs it before the tests)
imports: setup
	$(PYTHON) -m tests.static_imports
