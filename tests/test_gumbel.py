"""The Gumbel-max coupling (model.cdf_order='gumbel', kforcing_jax/gumbel.py).

Checked against its float64 numpy reference (the same integer hash, logs in float64), for the
marginal it must sample (chi-square over many noises), for never returning a zero-probability
token, and for the property it exists for: two nearby distributions pick the same token for
the same noise at least (1 - TV) / (1 + TV) of the time, where the id-order inverse CDF does not.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from kforcing_jax import gumbel, sampling


def _sample(probs, u):
  return np.asarray(jax.jit(sampling.inverse_cdf_from_probs, static_argnums=2)(
      jnp.asarray(probs, jnp.float32), jnp.asarray(u, jnp.float32), 'gumbel'))


def _rows(rng, n, vocab, concentration):
  p = rng.dirichlet(np.full(vocab, concentration), size=n).astype(np.float32)
  return p / p.sum(-1, keepdims=True)


@pytest.mark.parametrize('vocab, concentration', [(50, 1.0), (1000, 0.05), (8192, 0.3)])
def test_equals_float64_reference(vocab, concentration):
  rng = np.random.default_rng(vocab)
  probs = _rows(rng, 400, vocab, concentration)
  u = rng.random(400, dtype=np.float32)
  ours = _sample(probs, u)
  # only a near-tie of two scores (float32 logs vs float64) can differ: none in 400 rows
  np.testing.assert_array_equal(ours, gumbel.reference_sample(probs, u))


def test_marginal_is_the_distribution():
  p = np.array([0.4, 0.0, 0.25, 0.2, 0.1, 0.05, 0.0], np.float32)
  u = np.random.default_rng(1).random(100_000, dtype=np.float32)
  counts = np.bincount(_sample(np.broadcast_to(p, (len(u), len(p))), u), minlength=len(p))
  assert counts[1] == 0 and counts[6] == 0
  positive = p > 0
  _, pvalue = stats.chisquare(counts[positive], len(u) * p[positive] / p[positive].sum())
  assert pvalue > 1e-3, (counts, pvalue)


def test_zero_probability_never_and_single_token_always():
  rng = np.random.default_rng(2)
  probs = _rows(rng, 2000, 64, 0.2)
  probs[:, ::3] = 0.0                      # a third of the vocabulary impossible
  probs /= probs.sum(-1, keepdims=True)
  u = rng.random(2000, dtype=np.float32)
  tokens = _sample(probs, u)
  assert np.all(probs[np.arange(2000), tokens] > 0)
  one = np.zeros((5, 64), np.float32)
  one[np.arange(5), [0, 7, 31, 62, 63]] = 1.0
  edge_u = np.array([0.0, 0.5, np.nextafter(1.0, 0.0), 1e-30, 0.25], np.float32)
  np.testing.assert_array_equal(_sample(one, edge_u), [0, 7, 31, 62, 63])


def test_field_is_a_function_of_u_only_and_uniform():
  u = jnp.asarray(np.random.default_rng(3).random(64, dtype=np.float32))
  w = np.asarray(gumbel.uniform_field(u, 4096))
  np.testing.assert_array_equal(w, np.asarray(gumbel.uniform_field(u, 4096)))
  assert 0 < w.min() and w.max() < 1
  # uniform over tokens and over noises: Kolmogorov-Smirnov on 262144 values
  assert stats.kstest(w.ravel(), 'uniform').pvalue > 1e-3
  # neighbouring tokens of one noise and one token of neighbouring noises are uncorrelated
  assert abs(np.corrcoef(w[:, :-1].ravel(), w[:, 1:].ravel())[0, 1]) < 0.01
  assert abs(np.corrcoef(w[:-1].ravel(), w[1:].ravel())[0, 1]) < 0.01


def test_nearby_distributions_agree_as_the_coupling_promises():
  """p and q = p perturbed (TV ~0.1): shared-noise agreement >= (1 - TV) / (1 + TV) per row on
  average under the coupling; the id-order inverse CDF of the same pairs agrees far less."""
  rng = np.random.default_rng(4)
  p = _rows(rng, 64, 2000, 0.5)
  q = p * np.exp(0.25 * rng.standard_normal(p.shape)).astype(np.float32)
  q = (q / q.sum(-1, keepdims=True)).astype(np.float32)
  tv = 0.5 * np.abs(p - q).sum(-1)
  noises = 512
  u = rng.random((noises, 64), dtype=np.float32)
  agree = {}
  for order in ('gumbel', 'id'):
    f = jax.jit(jax.vmap(lambda uu, o=order: (
        sampling.inverse_cdf_from_probs(jnp.asarray(p), uu, o)
        == sampling.inverse_cdf_from_probs(jnp.asarray(q), uu, o))))
    agree[order] = np.asarray(f(jnp.asarray(u))).mean(0)
  bound = (1 - tv) / (1 + tv)
  # 512 noises per row: the mean over 64 rows has a standard error of ~0.003
  assert agree['gumbel'].mean() >= bound.mean() - 0.01, (agree['gumbel'].mean(), bound.mean())
  assert agree['gumbel'].mean() <= (1 - tv).mean() + 0.01     # no coupling beats 1 - TV
  assert agree['id'].mean() < agree['gumbel'].mean() - 0.2, agree


def test_token_interval_is_refused():
  with pytest.raises(ValueError, match='not an interval'):
    sampling.token_cdf_interval(jnp.ones((2, 4)) / 4, jnp.zeros((2,), jnp.int32), 'gumbel')
