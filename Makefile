# vtr monorepo. `make test` and `make demo` create/refresh the virtualenv themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FORKS := image/LLaVA image/InternVL image/Qwen3-VL video/Video-LLaVA
STAMP := $(VENV)/.vtr-installed
# Extra pip arguments, e.g. PIP_ARGS="--index-url https://download.pytorch.org/whl/cu128" (see README).
PIP_ARGS ?=
# Real checkpoint for `make demo` (hub id or local folder); empty = a built-in random model of BACKBONE.
MODEL ?=
# Which fork `make demo` runs: llava (default), internvl, qwen3vl or videollava.
BACKBONE ?= llava
DEMO_llava := llava.vtr.demo
DEMO_internvl := internvl_vtr.demo
DEMO_qwen3vl := visual_token_pruning.demo
DEMO_videollava := videollava.vtr.demo
# Arguments for the benchmark script.
BENCH_ARGS ?=

.PHONY: install test demo bench lint check-copies fix-copies clean

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
	@test -n "$(DEMO_$(BACKBONE))" || { echo "BACKBONE=$(BACKBONE): choose llava, internvl, qwen3vl or videollava" >&2; exit 2; }
	$(PY) -m $(DEMO_$(BACKBONE)) $(if $(MODEL),--model $(MODEL))

bench: install
	$(PY) scripts/bench.py $(BENCH_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

check-copies: install
	$(PY) scripts/check_copies.py

fix-copies: install
	$(PY) scripts/check_copies.py --fix

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache
