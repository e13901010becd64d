# The two commands: `make demo` (the whole pipeline on the default corpus) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/shakespeare_tiny.py
WORKDIR ?= runs/demo

.PHONY: demo test venv clean-venv compile-tpu

# Ahead-of-time compilation of the paper configs for TPU slices, on this CPU machine; needs
# libtpu, so a separate venv (jax[tpu] pinned in requirements-tpu.txt). Exit 1 = does not fit.
VENV_TPU := .venv-tpu
COMPILE_DIR ?= runs/compile_tpu

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

$(VENV_TPU)/.installed: requirements.txt requirements-tpu.txt
	$(PYTHON) -m venv $(VENV_TPU)
	$(VENV_TPU)/bin/python -m pip install -q --upgrade pip
	$(VENV_TPU)/bin/python -m pip install -q -r requirements.txt -r requirements-tpu.txt
	touch $@

compile-tpu: $(VENV_TPU)/.installed
	JAX_PLATFORMS=cpu $(VENV_TPU)/bin/python -m launch.compile_tpu --config=configs/lm1b_ar.py \
	    --topology=v5e-16 --output=$(COMPILE_DIR)/lm1b_v5e-16.json
	JAX_PLATFORMS=cpu $(VENV_TPU)/bin/python -m launch.compile_tpu --config=configs/owt_ar.py \
	    --topology=v5p-8 --output=$(COMPILE_DIR)/owt_v5p-8.json

clean-venv:
	rm -rf $(VENV)
