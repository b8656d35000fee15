# vtr monorepo. `make test` and `make demo` create/refresh the virtualenv themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
space := $(subst ,, )
# The forks' folders, from forks.toml (the registry of forks and model families; scripts/forks.py reads it).
FORKS := $(shell $(PYTHON) scripts/forks.py paths 2>&1)
ifneq ($(filter-out 0,$(.SHELLSTATUS)),)  # (GNU make >= 4.2 sets .SHELLSTATUS)
$(error $(subst forks.py: error: ,,$(FORKS)))
endif
STAMP := $(VENV)/.vtr-installed
# Extra pip arguments, e.g. PIP_ARGS="--index-url https://download.pytorch.org/whl/cu128" (see README).
PIP_ARGS ?=
# Real checkpoint for `make demo` (hub id or local folder); empty = a built-in random model of BACKBONE.
MODEL ?=
# Which model family `make demo` runs (the demo of the fork serving it): a [family.*] of forks.toml, default llava.
BACKBONE ?= llava
ifneq ($(filter demo,$(MAKECMDGOALS)),)
DEMO := $(shell $(PYTHON) scripts/forks.py demo '$(BACKBONE)' 2>&1)
ifneq ($(filter-out 0,$(.SHELLSTATUS)),)  # (GNU make >= 4.2 sets .SHELLSTATUS)
$(error BACKBONE=$(BACKBONE): $(subst forks.py: error: ,,$(DEMO)))
endif
endif
# Arguments for the benchmark script.
BENCH_ARGS ?=

.PHONY: install test demo bench lint check-copies fix-copies share-method clean

install: $(STAMP)

$(STAMP): requirements.txt $(addsuffix /pyproject.toml,$(FORKS)) scripts/post_install.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(PIP_ARGS) -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation $(addprefix -e ,$(FORKS))
	$(PY) scripts/post_install.py
	@touch $@

test: install check-copies
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install
	$(PY) -m $(DEMO) $(if $(MODEL),--model $(MODEL))

bench: install
	$(PY) scripts/bench.py $(BENCH_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

check-copies: install
	$(PY) scripts/check_copies.py

fix-copies: install
	$(PY) scripts/check_copies.py --fix

# A method written in one fork (strategy/$(METHOD).py + its import line) into every fork, and the README matrix.
share-method:
	@test -n "$(METHOD)" || { echo "usage: make share-method METHOD=<strategy file name without .py>" >&2; exit 2; }
	@test -x $(PY) || { echo "$(PY) does not exist yet: run make install (or make test) first" >&2; exit 2; }
	$(PY) scripts/check_copies.py --share $(METHOD)
	PYTHONPATH=$(subst $(space),:,$(FORKS)) $(PY) scripts/capability_matrix.py --write

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache
