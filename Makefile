# Two commands on a fresh Debian/Ubuntu machine: `make run` (the main job) and `make test`.
# Both set everything up first: a virtualenv with the project, and the Fashion-MNIST files.
# python3 when it is 3.11 or newer (Keras 3.13, the first with the safe-mode fixes, needs it),
# else the newest python3.1X on PATH; PYTHON=... picks one.
ifndef PYTHON
PYTHON := $(shell for p in python3 python3.14 python3.13 python3.12 python3.11; do \
	$$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && { echo $$p; exit; }; \
	done; echo python3)
endif
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FMNIST_SYSTEM_DIR := /usr/share/datasets/fashion-mnist
ARGS ?=

.PHONY: setup venv-module data run test lint bench-reference

setup: $(VENV)/.installed data

$(VENV)/.installed: pyproject.toml
	@v=$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) \
		|| { echo "$(PYTHON) not found: install Python 3.11 or newer, or name it with PYTHON=..."; exit 1; }; \
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "$(PYTHON) is Python $$v; \
	fmnist-search needs 3.11 or newer (Keras 3.13 does): install one (e.g. apt-get install \
	python3.11), then run make with PYTHON=python3.11"; exit 1; }
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || $(MAKE) --no-print-directory venv-module
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,dev]'
	touch $@

# Debian and Ubuntu ship `venv` without ensurepip (it is in pythonX.Y-venv): install it once.
venv-module:
	@ver=$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])') || exit 1; \
	if command -v apt-get >/dev/null 2>&1; then \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python$$ver-venv; \
	else \
		echo "$(PYTHON) cannot create a virtualenv (no venv/ensurepip): install its venv package"; \
		exit 1; \
	fi

# The data comes from Debian's dataset-fashion-mnist package; FMNIST_DATA_DIR overrides.
data:
	@if [ -n "$$FMNIST_DATA_DIR" ] || [ -f $(FMNIST_SYSTEM_DIR)/train-images-idx3-ubyte.gz ]; then \
		true; \
	elif command -v apt-get >/dev/null 2>&1; then \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "no apt-get here: put the four Fashion-MNIST IDX files in a folder and set FMNIST_DATA_DIR"; \
	fi

run: setup
	$(PY) search/run.py --space vgg $(ARGS)

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .

bench-reference: setup
	$(PY) bench/train_reference.py
