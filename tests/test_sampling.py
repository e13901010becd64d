"""The float32 inverse-CDF sampler against a float64 reference written from METHOD.md s.1/s.4.

Reference: p = softmax(logits) in float64, CDF = cumsum(p) in token-id order, the sample for
u in (0, 1) is the smallest v with CDF(v) >= u, and u = 0 is the limit u -> 0+ (the first token
of positive probability). The float32 sampler may disagree only for u within rounding distance of
an interval edge, and must never return a token of probability 0.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from kforcing_jax import sampling

NEG = -1000.0                 # the logit the backbone gives the mask id and vocabulary padding
EDGE_TOL = 1e-5               # a disagreement must have u this close to a float64 interval edge


def max_disagreement(vocab: int) -> float:
  """Fraction of u that may disagree for one distribution: each of the V float32 CDF edges
  sits a few float32 ulps of 1.0 (2^-24) from the float64 edge (rounding accumulates over the
  blockwise sums), so about V * 4 * 2^-24 of the unit interval is at stake, plus a 1e-3 floor
  for small vocabularies. Where disagreements may happen is checked separately (EDGE_TOL)."""
  return 1e-3 + 4 * vocab * 2.0 ** -24
NUM_U = 10_000
ONE_MINUS = np.nextafter(np.float32(1.0), np.float32(0.0))  # the largest float32 u < 1


# ---------------------------------------------------------------------------------------------
# float64 reference


def ref_probs(logits):
  x = np.asarray(logits, np.float64)
  e = np.exp(x - x.max())
  return e / e.sum()


def ref_cdf(probs):
  cdf = np.cumsum(probs)
  return cdf / cdf[-1]


def ref_inverse_cdf(probs, u):
  """Smallest v with CDF(v) >= u; u = 0 -> smallest v with CDF(v) > 0 (first positive token)."""
  cdf = ref_cdf(probs)
  u = np.asarray(u, np.float64)
  out = np.searchsorted(cdf, u, side='left')
  out = np.where(u == 0.0, np.searchsorted(cdf, 0.0, side='right'), out)
  return out


def ref_interval(probs, tokens):
  """Float64 [lo, hi] of each token's u-interval."""
  cdf = ref_cdf(probs)
  below = np.concatenate([[0.0], cdf[:-1]])
  return below[tokens], cdf[tokens]


def test_reference_on_a_hand_computed_distribution():
  # p = [0, .25, 0, .5, .25]: intervals (0,.25] -> 1, (.25,.75] -> 3, (.75,1) -> 4.
  probs = np.array([0.0, 0.25, 0.0, 0.5, 0.25])
  u = np.array([0.0, 0.1, 0.25, 0.2500001, 0.75, 0.76, 0.999])
  np.testing.assert_array_equal(ref_inverse_cdf(probs, u), [1, 1, 1, 3, 3, 4, 4])


# ---------------------------------------------------------------------------------------------
# float32 sampler, vectorised over many u for one distribution

@jax.jit
def _sample_many(logits, us):
  return jax.lax.map(lambda u: sampling.inverse_cdf_sample(logits, u), us, batch_size=1000)


def sample_many(logits, us):
  return np.asarray(_sample_many(jnp.asarray(logits, jnp.float32), jnp.asarray(us, jnp.float32)))


def _with_zero_tokens(logits, mask_id=0, real=None, extra=()):
  logits = np.array(logits, np.float32)
  logits[mask_id] = NEG
  if real is not None:
    logits[real:] = NEG
  logits[list(extra)] = NEG
  return logits


def _distributions():
  rng = np.random.default_rng(1234)
  out = {}
  for v in (10, 1000, 8192, 50304):
    out[f'normal_s2_V{v}'] = rng.standard_normal(v).astype(np.float32) * 2.0
  peaked = rng.standard_normal(8192).astype(np.float32)
  peaked[4321] += 30.0
  out['peaked_mid_V8192'] = peaked
  peaked_first = rng.standard_normal(1000).astype(np.float32)
  peaked_first[1] += 30.0
  out['peaked_first_with_mask_V1000'] = _with_zero_tokens(peaked_first, mask_id=0)
  out['flat_V8192'] = np.zeros(8192, np.float32)
  out['flat_V50304'] = np.zeros(50304, np.float32)
  out['zeros_mask0_padded_V8192'] = _with_zero_tokens(
      rng.standard_normal(8192).astype(np.float32), mask_id=0, real=8000,
      extra=range(100, 4000, 7))
  out['zeros_mask0_padded_V50304'] = _with_zero_tokens(
      rng.standard_normal(50304).astype(np.float32) * 2.0, mask_id=0, real=50258)
  out['flat_mask103_padded_V30720'] = _with_zero_tokens(
      np.zeros(30720, np.float32), mask_id=103, real=30522)
  return out


DISTRIBUTIONS = _distributions()


def _check_against_reference(logits, us):
  """Returns (#disagreements, max edge distance of a disagreement); asserts the hard rules."""
  probs = ref_probs(logits)
  got = sample_many(logits, us)
  want = ref_inverse_cdf(probs, us)
  assert np.all(probs[got] > 0), 'sampled a zero-probability token'
  bad = got != want
  if not bad.any():
    return 0, 0.0
  u_bad = us[bad].astype(np.float64)
  # Every disagreement lies within EDGE_TOL of a float64 edge, and the returned token's own
  # float64 interval is within EDGE_TOL of u (so the token is off by rounding, not by logic).
  edges = np.concatenate([[0.0], ref_cdf(probs)])
  dist = np.abs(u_bad[:, None] - edges[None, :]).min(axis=1)
  lo, hi = ref_interval(probs, got[bad])
  assert np.all(u_bad >= lo - EDGE_TOL) and np.all(u_bad <= hi + EDGE_TOL), (
      u_bad, lo, hi, got[bad], want[bad])
  assert dist.max() < EDGE_TOL, dist.max()
  return int(bad.sum()), float(dist.max())


def test_agrees_with_float64_reference_at_random_u():
  rng = np.random.default_rng(7)
  total_bad, allowed = 0, 0.0
  report = {}
  for name, logits in DISTRIBUTIONS.items():
    us = rng.random(NUM_U, dtype=np.float32)
    bad, dist = _check_against_reference(logits, us)
    report[name] = (bad, dist)
    assert bad / NUM_U < max_disagreement(logits.shape[-1]), (name, bad)
    total_bad += bad
    allowed += max_disagreement(logits.shape[-1]) * NUM_U / 2
  # pooled over all distributions the rate must be well inside the per-distribution bound
  assert total_bad < allowed, report


def _positive_neighbours(probs, got, want):
  """True where `got` is `want` or the adjacent positive-probability token of `want`."""
  rank = np.cumsum(probs > 0) - 1  # rank among positive tokens
  return np.abs(rank[got] - rank[want]) <= 1


@pytest.mark.parametrize('name', ['normal_s2_V1000', 'flat_V8192', 'zeros_mask0_padded_V8192',
                                  'flat_mask103_padded_V30720'])
def test_u_exactly_at_interval_edges_maps_to_a_neighbour(name):
  # These distributions have all positive probabilities far above float32 resolution, so
  # "neighbour" (adjacent positive-probability token) is well defined.
  logits = DISTRIBUTIONS[name]
  probs = ref_probs(logits)
  edges = ref_cdf(probs)[probs > 0][:-1].astype(np.float32)  # u must stay < 1
  edges = np.concatenate([edges, np.nextafter(edges, np.float32(0)),
                          np.nextafter(edges, np.float32(1))])
  got = sample_many(logits, edges)
  want = ref_inverse_cdf(probs, edges)
  assert np.all(probs[got] > 0)
  assert np.all(_positive_neighbours(probs, got, want)), np.flatnonzero(
      ~_positive_neighbours(probs, got, want))[:10]


# ---------------------------------------------------------------------------------------------
# zero-probability tokens, u = 0 and u -> 1


def test_mask_id_zero_with_u_zero_returns_first_positive_token():
  logits = _with_zero_tokens(np.zeros(64, np.float32), mask_id=0)
  assert int(sampling.inverse_cdf_sample(jnp.asarray(logits), jnp.float32(0.0))) == 1
  logits = _with_zero_tokens(np.zeros(64, np.float32), mask_id=0, extra=[1, 2, 3])
  assert int(sampling.inverse_cdf_sample(jnp.asarray(logits), jnp.float32(0.0))) == 4


@pytest.mark.parametrize('name', list(DISTRIBUTIONS))
def test_u_zero_and_u_max_are_exact(name):
  logits = DISTRIBUTIONS[name]
  probs = ref_probs(logits)
  positive = np.flatnonzero(probs > 0)
  us = np.array([0.0, ONE_MINUS], np.float32)
  got = sample_many(logits, us)
  want = ref_inverse_cdf(probs, us)
  assert got[0] == want[0] == positive[0]
  assert probs[got[1]] > 0
  if probs[positive[-1]] > 1e-6:  # the float64 answer at 1 - 6e-8 is the last positive token
    assert got[1] == want[1] == positive[-1]


def test_never_a_zero_probability_token_around_its_edges():
  # Zero-probability tokens at the start (mask id), in runs in the middle, and a padded tail;
  # u placed exactly at, just below and just above the (shared) edges around each of them.
  rng = np.random.default_rng(3)
  v, real = 4096, 4000
  zero = [0, 1, 17, 18, 19, 500, 2047, 2048, 3998]
  logits = _with_zero_tokens(rng.standard_normal(v).astype(np.float32), mask_id=0, real=real,
                             extra=zero)
  probs = ref_probs(logits)
  cdf = ref_cdf(probs)
  zero_ids = np.flatnonzero(probs == 0)
  assert set(zero) <= set(zero_ids) and zero_ids.max() == v - 1
  centres = np.concatenate([cdf[zero_ids], cdf[np.maximum(zero_ids - 1, 0)],
                            cdf[np.minimum(zero_ids + 1, v - 1)]]).astype(np.float32)
  centres = centres[centres < 1]
  us = np.concatenate([centres, np.nextafter(centres, np.float32(0)),
                       np.nextafter(centres, np.float32(1)), [0.0, ONE_MINUS]]).astype(np.float32)
  got = sample_many(logits, us)
  assert np.all(probs[got] > 0), got[probs[got] == 0]
  assert got[-2] == 2 and got[-1] == real - 1  # u = 0 and u = 1 - 2^-24


def test_single_positive_token_is_always_returned():
  logits = np.full(300, NEG, np.float32)
  logits[123] = 0.5
  us = np.array([0.0, 1e-30, 0.3, 0.5, ONE_MINUS], np.float32)
  np.testing.assert_array_equal(sample_many(logits, us), 123)


def test_batched_shapes():
  # (B, V) logits with (B,) u and (B,) temperature, as the decoders call it.
  rng = np.random.default_rng(5)
  logits = rng.standard_normal((3, 4, 50)).astype(np.float32)
  u = rng.random((3, 4), dtype=np.float32)
  got = np.asarray(sampling.inverse_cdf_sample(jnp.asarray(logits), jnp.asarray(u)))
  assert got.shape == (3, 4) and got.dtype == np.int32
  want = np.array([[ref_inverse_cdf(ref_probs(logits[b, s]), u[b, s]) for s in range(4)]
                   for b in range(3)])
  np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------------------------
# temperature


def test_temperature_half_equals_doubled_logits():
  rng = np.random.default_rng(11)
  logits = jnp.asarray(rng.standard_normal((1000, 64)).astype(np.float32) * 2)
  u = jnp.asarray(rng.random(1000, dtype=np.float32))
  at_half = np.asarray(sampling.inverse_cdf_sample(logits, u, 0.5))
  np.testing.assert_array_equal(at_half, np.asarray(sampling.inverse_cdf_sample(logits * 2, u)))
  assert np.mean(at_half != np.asarray(sampling.inverse_cdf_sample(logits, u))) > 0.1
  # Per-row temperatures.
  temps = jnp.asarray(np.where(np.arange(1000) % 2, 0.5, 2.0).astype(np.float32))
  per_row = np.asarray(sampling.inverse_cdf_sample(logits, u, temps))
  scaled = logits * jnp.where(jnp.arange(1000) % 2, 2.0, 0.5)[:, None]
  np.testing.assert_array_equal(per_row, np.asarray(sampling.inverse_cdf_sample(scaled, u)))
  # And against the float64 reference at temperature 0.5.
  want = np.array([ref_inverse_cdf(ref_probs(np.asarray(logits[i], np.float64) / 0.5), u[i])
                   for i in range(1000)])
  np.testing.assert_array_equal(at_half, want)


# ---------------------------------------------------------------------------------------------
# distribution of samples


def test_chi_square_goodness_of_fit():
  logits = np.array([1.0, -0.5, 2.0, 0.0, 0.3, -2.0, 1.5, 0.7, -1.0, 0.1], np.float32)
  p = ref_probs(logits)
  n = 20_000
  u = np.random.default_rng(2024).random(n, dtype=np.float32)
  counts = np.bincount(sample_many(logits, u), minlength=10)
  assert stats.chisquare(counts, n * p).pvalue > 1e-3
  # The test has power: the same counts reject the temperature-2 distribution.
  assert stats.chisquare(counts, n * ref_probs(logits / 2)).pvalue < 1e-3


# ---------------------------------------------------------------------------------------------
# noise inversion: token_cdf_interval is the inverse of inverse_cdf_from_probs


@jax.jit
def _intervals_and_roundtrip(probs, tokens, fractions):
  """For each token: [lo, hi), and the samples at lo, at a point inside, and just below hi."""
  def one(args):
    token, fraction = args
    lo, hi = sampling.token_cdf_interval(probs, token)
    inside = jnp.maximum(jnp.minimum(lo + fraction * (hi - lo), jnp.nextafter(hi, 0.0)), lo)
    top = jnp.maximum(jnp.nextafter(hi, 0.0), lo)
    sample = lambda u: sampling.inverse_cdf_from_probs(probs, u)  # noqa: E731
    return lo, hi, sample(lo), sample(inside), sample(top)
  return jax.lax.map(one, (tokens, fractions), batch_size=256)


def _roundtrip(logits, tokens, seed):
  probs = sampling.probabilities(jnp.asarray(logits, jnp.float32))
  tokens = jnp.asarray(tokens, jnp.int32)
  fractions = jnp.asarray(np.random.default_rng(seed).random(tokens.shape, dtype=np.float32))
  lo, hi, at_lo, at_inside, at_top = map(np.asarray, _intervals_and_roundtrip(
      probs, tokens, fractions))
  return np.asarray(probs), lo, hi, at_lo, at_inside, at_top


@pytest.mark.parametrize('v,scale', [(1000, 1.0), (8192, 1.0), (8192, 3.0), (50304, 3.0)])
def test_token_cdf_interval_roundtrip(v, scale):
  # Every token (a random third of them for V = 50304, plus the first and last positive ones):
  # u = lo, u = a random point inside, u = the largest float32 below hi must all map back.
  rng = np.random.default_rng(v)
  logits = _with_zero_tokens(rng.standard_normal(v).astype(np.float32) * scale, mask_id=0,
                             real=v - 5, extra=[7, 8])
  ids = np.arange(v) if v <= 8192 else np.unique(np.concatenate(
      [[1, v - 6], rng.choice(v, v // 3, replace=False)]))
  probs, lo, hi, at_lo, at_inside, at_top = _roundtrip(logits, ids, seed=v + 1)
  p = probs[ids]
  nonempty = (lo < hi) & (p > 0)
  # First and last positive tokens (1 and v - 6) are the exact ends of [0, 1).
  first, last = np.searchsorted(ids, [1, v - 6])
  assert ids[first] == 1 and ids[last] == v - 6 and p[first] > 0 and p[last] > 0
  assert lo[first] == 0.0 and hi[last] == 1.0 and nonempty[first] and nonempty[last]
  # Zero-probability tokens have empty intervals; the non-empty ones carry the mass.
  assert np.all(hi[p == 0] <= lo[p == 0])
  assert p[nonempty].sum() > 0.999 * p.sum()
  for name_, got in (('lo', at_lo), ('inside', at_inside), ('just below hi', at_top)):
    wrong = nonempty & (got != ids)
    assert not wrong.any(), (
        f'u = {name_} of token interval maps to another token for {wrong.sum()} tokens, e.g. '
        f'token {ids[wrong][:5]} -> {got[wrong][:5]}, p = {p[wrong][:5]}')


def test_token_cdf_interval_on_a_hand_computed_distribution():
  probs = jnp.asarray([0.0, 0.25, 0.0, 0.5, 0.25], jnp.float32)
  lo, hi = jax.vmap(lambda t: sampling.token_cdf_interval(probs, t))(jnp.arange(5))
  np.testing.assert_array_equal(np.asarray(lo), [0.0, 0.0, 0.25, 0.25, 0.75])
  np.testing.assert_array_equal(np.asarray(hi), [0.0, 0.25, 0.25, 0.75, 1.0])
  us = jnp.asarray([0.0, 0.2499, 0.25, 0.7499, 0.75, ONE_MINUS], jnp.float32)
  np.testing.assert_array_equal(
      np.asarray(jax.vmap(lambda u: sampling.inverse_cdf_from_probs(probs, u))(us)),
      [1, 1, 3, 3, 4, 4])
