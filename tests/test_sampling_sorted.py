"""The sorted-order sampler (model.cdf_order='sorted') against a float64 reference.

Reference: p = softmax(logits) in float64; tokens ordered by descending p, ties by ascending id
(a stable sort); CDF = cumsum of p in that order; the sample for u in (0, 1) is the first token
in that order with CDF >= u, u = 0 the most likely token. The float32 sampler (bisection, no
sort) may disagree only within rounding distance of an interval edge, and must never return a
token of probability 0.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from kforcing_jax import sampling
from tests.test_sampling import DISTRIBUTIONS, EDGE_TOL, NEG, ONE_MINUS, max_disagreement
from tests.test_sampling import ref_probs

NUM_U = 5000


def ref_order(probs):
  return np.argsort(-probs, kind='stable')


def ref_sorted_sample(probs, u):
  order = ref_order(probs)
  cdf = np.cumsum(probs[order])
  cdf = cdf / cdf[-1]
  u = np.asarray(u, np.float64)
  rank = np.searchsorted(cdf, u, side='left')
  rank = np.where(u == 0.0, np.searchsorted(cdf, 0.0, side='right'), rank)
  return order[np.minimum(rank, len(order) - 1)], np.concatenate([[0.0], cdf])


@jax.jit
def _sample_many(logits, us):
  return jax.lax.map(lambda u: sampling.inverse_cdf_sample(logits, u, 1.0, 'sorted'), us,
                     batch_size=500)


def sample_many(logits, us):
  return np.asarray(_sample_many(jnp.asarray(logits, jnp.float32), jnp.asarray(us, jnp.float32)))


def test_hand_computed_distribution():
  # p = [0, .25, 0, .5, .25]: sorted order 3 (.5), 1 (.25), 4 (.25; tie, larger id last)
  logits = np.log(np.array([1e-30, 0.25, 1e-30, 0.5, 0.25]))
  logits[[0, 2]] = NEG
  us = np.array([0.0, 0.49, 0.5, 0.74, 0.75, ONE_MINUS], np.float32)
  np.testing.assert_array_equal(sample_many(logits, us), [3, 3, 1, 1, 4, 4])


@pytest.mark.parametrize('name', ['normal_s2_V1000', 'normal_s2_V8192', 'peaked_mid_V8192',
                                  'peaked_first_with_mask_V1000', 'zeros_mask0_padded_V8192',
                                  'flat_mask103_padded_V30720'])
def test_agrees_with_float64_reference(name):
  logits = DISTRIBUTIONS[name]
  probs = ref_probs(logits)
  us = np.random.default_rng(3).random(NUM_U, dtype=np.float32)
  got = sample_many(logits, us)
  want, edges = ref_sorted_sample(probs, us)
  assert np.all(probs[got] > 0), 'sampled a zero-probability token'
  bad = got != want
  assert bad.mean() < max_disagreement(logits.shape[-1]), (name, bad.sum())
  if bad.any():
    # only within rounding distance of an edge, or between two tokens whose probabilities
    # are equal in float32 but not in float64 (the order of a near tie is the rounding's)
    dist = np.abs(us[bad].astype(np.float64)[:, None] - edges[None, :]).min(axis=1)
    near_tie = np.abs(probs[got[bad]] - probs[want[bad]]) <= 1e-6 * probs[want[bad]]
    assert np.all((dist < EDGE_TOL) | near_tie), (dist, probs[got[bad]], probs[want[bad]])


@pytest.mark.parametrize('name', list(DISTRIBUTIONS))
def test_u_zero_is_the_mode_and_u_max_the_least_likely_positive_token(name):
  logits = DISTRIBUTIONS[name]
  probs = ref_probs(logits)
  got = sample_many(logits, np.array([0.0, ONE_MINUS], np.float32))
  order = ref_order(probs)
  assert got[0] == order[0]  # the most likely token, smallest id among ties
  assert probs[got[1]] > 0
  positive = order[probs[order] > 0]
  if probs[positive[-1]] > 1e-6:  # far above float32 resolution: exactly the last one
    assert got[1] == positive[-1]


def test_never_a_zero_probability_token():
  rng = np.random.default_rng(9)
  logits = rng.standard_normal(2048).astype(np.float32)
  logits[[0, 5, 6, 7, 1000]] = NEG
  logits[2000:] = NEG
  us = np.concatenate([rng.random(4000, dtype=np.float32), [0.0, ONE_MINUS],
                       np.nextafter(np.float32(1), np.float32(0)) - rng.random(50).astype(
                           np.float32) * 1e-6]).astype(np.float32)
  got = sample_many(logits, us)
  assert np.all(ref_probs(logits)[got] > 0)


def test_chi_square_marginal_and_power():
  logits = np.array([1.0, -0.5, 2.0, 0.0, 0.3, -2.0, 1.5, 0.7, -1.0, 0.1, 2.0], np.float32)
  p = ref_probs(logits)
  n = 20_000
  counts = np.bincount(sample_many(logits, np.random.default_rng(5).random(n, np.float32)),
                       minlength=p.size)
  assert stats.chisquare(counts, n * p).pvalue > 1e-3
  assert stats.chisquare(counts, n * ref_probs(logits / 2)).pvalue < 1e-3


def test_orders_differ_but_share_the_marginal():
  # the same u gives different tokens in the two orders, each an exact sampler
  rng = np.random.default_rng(6)
  logits = jnp.asarray(rng.standard_normal((4000, 50)).astype(np.float32) * 2)
  u = jnp.asarray(rng.random(4000, dtype=np.float32))
  by_id = np.asarray(sampling.inverse_cdf_sample(logits, u))
  by_rank = np.asarray(sampling.inverse_cdf_sample(logits, u, 1.0, 'sorted'))
  assert np.mean(by_id != by_rank) > 0.5
  # u < p_top gives the mode in the sorted order, whatever the context
  probs = np.asarray(sampling.probabilities(logits))
  small = np.asarray(u) < probs.max(-1) * 0.999
  np.testing.assert_array_equal(by_rank[small], probs.argmax(-1)[small])


def test_unknown_order_is_refused():
  with pytest.raises(ValueError, match='cdf_order'):
    sampling.inverse_cdf_sample(jnp.zeros(4), jnp.float32(0.5), 1.0, 'alphabetical')


@jax.jit
def _roundtrip(probs, tokens, fractions):
  lo, hi = sampling.token_cdf_interval(probs, tokens, 'sorted')
  inside = jnp.maximum(jnp.minimum(lo + fractions * (hi - lo), jnp.nextafter(hi, 0.0)), lo)
  sample = lambda u: sampling.inverse_cdf_from_probs(probs, u, 'sorted')  # noqa: E731
  return lo, hi, sample(lo), sample(inside)


@pytest.mark.parametrize('v,scale', [(1000, 1.0), (8192, 3.0)])
def test_noise_inversion_roundtrip(v, scale):
  # the interval of every token, mapped back by the sampler, gives the token (one row per token)
  rng = np.random.default_rng(v)
  logits = rng.standard_normal(v).astype(np.float32) * scale
  logits[[0, 7, 8]] = NEG
  logits[:50] = logits[50]  # ties: 47 tokens of equal probability (plus the masked ones)
  logits[[0, 7, 8]] = NEG
  probs = sampling.probabilities(jnp.asarray(logits))
  ids = jnp.arange(v, dtype=jnp.int32)
  rows = jnp.broadcast_to(probs, (v, v))
  fractions = jnp.asarray(rng.random(v, dtype=np.float32))
  lo, hi, at_lo, at_inside = map(np.asarray, _roundtrip(rows, ids, fractions))
  p = np.asarray(probs)
  nonempty = (lo < hi) & (p > 0)
  assert np.all(hi[p == 0] <= lo[p == 0])
  assert p[nonempty].sum() > 0.999
  assert lo[np.argmax(p)] == 0.0
  for got in (at_lo, at_inside):
    wrong = nonempty & (got != np.arange(v))
    assert not wrong.any(), (np.flatnonzero(wrong)[:5], got[wrong][:5])
