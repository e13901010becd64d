"""kforcing_jax.metrics: per-sample NLL (pooling to the generative perplexity), the bootstrap
intervals over completions, distinct-n shares and the mode-seeking rule."""

import jax
import numpy as np
import pytest

from configs import test_tiny
from kforcing_jax import metrics, models
from tests.helpers.params import random_params


def test_sample_nll_pools_to_the_one_forward_perplexity(monkeypatch):
  config = test_tiny.get_config()
  model = models.teacher(config)
  params = random_params(model, 0)
  samples = np.asarray(jax.random.randint(jax.random.key(2), (5, 16), 1, 256), np.int32)
  logits, _ = jax.jit(lambda p, t: model.module(p)(t))(params, samples)
  monkeypatch.setattr(metrics, 'NLL_CHUNK_ELEMENTS', 2 * 16 * 256)  # 3 chunks, one padded
  nll, count = metrics.sample_nll(model, params, samples, 4)
  assert nll.shape == count.shape == (5,)
  np.testing.assert_array_equal(count, 12.0)
  # row 3 alone, by hand from the full forward's logits
  logp = jax.nn.log_softmax(logits[3, 3:-1], axis=-1)
  by_hand = -float(np.sum(np.take_along_axis(np.asarray(logp), samples[3, 4:, None], -1)))
  assert nll[3] == pytest.approx(by_hand, rel=1e-5)
  assert metrics.pooled_perplexity(nll, count) == pytest.approx(
      metrics.perplexity_from_logits(logits, samples, 4), rel=1e-5)


def test_distinct_shares_sum_to_distinct_n():
  rows = np.asarray([[1, 2, 1, 2], [1, 2, 3, 4], [5, 5, 5, 5]])
  for n in (1, 2, 4):
    shares, counts = metrics.distinct_shares(rows, n)
    assert shares.sum() / counts.sum() == pytest.approx(metrics.distinct_n(rows, n))
  # bigram (1,2) occurs 3 times in the pool: row 0 holds two of them, (2,1) is its own
  shares, counts = metrics.distinct_shares(rows, 2)
  assert shares[0] == pytest.approx(2 / 3 + 1)
  np.testing.assert_array_equal(counts, 3.0)
  with pytest.raises(ValueError, match='4-grams'):
    metrics.distinct_shares(rows[:, :3], 4)


def fake_completions(num, seed=0):
  """Rows of a 50-token vocabulary with row-dependent repetition, and per-row NLL / counts."""
  rng = np.random.default_rng(seed)
  vocab = rng.integers(5, 50, size=num)
  rows = np.stack([rng.integers(0, v, size=40) for v in vocab])
  nll = rng.gamma(2.0, 30.0, size=num)
  return rows, nll, np.full(num, 40.0)


@pytest.mark.parametrize('which', ['ppl', 'entropy', 'distinct'])
def test_bootstrap_interval_contains_the_estimate_and_shrinks_with_samples(which):
  widths = []
  for num in (32, 512):
    rows, nll, count = fake_completions(num)
    estimate, (lo, hi) = {
        'ppl': lambda: (metrics.pooled_perplexity(nll, count),
                        metrics.perplexity_interval(nll, count)),
        'entropy': lambda: (metrics.unigram_entropy(rows), metrics.entropy_interval(rows)),
        'distinct': lambda: (metrics.distinct_n(rows, 2), metrics.distinct_interval(rows, 2)),
    }[which]()
    assert lo < estimate < hi
    widths.append(hi - lo)
  # 16x the completions: the interval narrows about 4x
  assert widths[1] < widths[0] / 2.5


def test_bootstrap_is_reproducible_and_matches_the_normal_approximation():
  rng = np.random.default_rng(3)
  values = rng.normal(10.0, 2.0, size=400)
  ones = np.ones_like(values)
  lo, hi = metrics.bootstrap_ratio_interval(values, ones)
  assert (lo, hi) == metrics.bootstrap_ratio_interval(values, ones)
  assert (lo, hi) != metrics.bootstrap_ratio_interval(values, ones, seed=1)
  half = 1.96 * values.std() / np.sqrt(len(values))  # the mean's 95% interval, ~0.2
  assert hi - lo == pytest.approx(2 * half, rel=0.15)
  assert (lo + hi) / 2 == pytest.approx(values.mean(), abs=0.05)


def test_mode_seeking_rule():
  # the demo k=1 student: 30.2 / 3.74 against the AR's 215.5 / 4.31
  assert metrics.is_mode_seeking(30.2, 3.74, 215.5, 4.31)
  assert not metrics.is_mode_seeking(30.2, 4.30, 215.5, 4.31)    # as varied: not mode-seeking
  assert not metrics.is_mode_seeking(246.5, 3.72, 215.5, 4.31)   # worse ppl: another failure
  assert not metrics.is_mode_seeking(0.9 * 215.5, 3.0, 215.5, 4.31)  # the bound itself
