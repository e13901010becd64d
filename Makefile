# The two commands: `make demo` (the whole pipeline on the default corpus) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/shakespeare_tiny.py
WORKDIR ?= runs/demo

.PHONY: demo test venv clean-venv

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

demo: venv
	$(PY) -m kforcing_jax.pipeline --config=$(CONFIG) --workdir=$(WORKDIR)

test: venv
	$(PY) -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
