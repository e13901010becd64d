"""Inverse-CDF sampling with explicit uniforms: the map (distribution, u) -> token.

The AR teacher's sample for noise u is the first token v, in a fixed per-context order, whose
CDF(v) > u, the CDF being the cumulative sum of probabilities in that order. Two orders
(`CDF_ORDERS`, the config field model.cdf_order):
  'id'      token-id order: the authors' sampler, which their released checkpoints learned;
  'sorted'  descending probability, ties by id: u in [0, p_top) is the most likely token, and
            the noise -> token map is monotone in rank.
Any fixed order is an exact sampler of the distribution. A third rule, 'gumbel', is the
Gumbel-max coupling (kforcing_jax/gumbel.py): exact as well, and robust to small changes of the
distribution, but with no order in u. The same functions produce the AR
decoder's samples, the k=1 distillation targets and the noise inversion, so all of them agree
token for token within one order.

The authors compute the CDF in float64. Accelerators want float32, so this version is built
to keep the properties that matter, independent of rounding in the cumulative sum:
  * a token of probability exactly 0 (the mask id, vocabulary padding, underflow) is never
    returned, even where a rounded CDF is not monotone;
  * u = 0 returns the first token of positive probability (the float64 limit u -> 0+);
  * u -> 1 returns the last token of positive probability (the CDF is normalised so its last
    entry is exactly 1.0, and the last positive token is the fallback when rounding leaves
    no entry above u);
  * elsewhere it agrees with a float64 reference except for u within a few float32 ulps of an
    interval edge: at most ~4 * V * 2^-24 of the unit interval (0.35% of u for a flat
    30720-token vocabulary, far less for peaked ones; tests/test_sampling.py measures this).
METHOD.md writes "smallest v with CDF(v) >= u"; ">" differs only for u exactly on an edge
and is what makes u = 0 skip leading zero-probability tokens. The sorted order (below,
`_sorted_sample`) keeps the first two properties exactly, returns the least likely positive
token as u -> 1, and agrees with a float64 sort-based reference except within float32 rounding
of an interval edge.
"""

import jax
import jax.numpy as jnp

from kforcing_jax import gumbel


def probabilities(logits: jax.Array, temperature: jax.Array | float = 1.0) -> jax.Array:
  """softmax(logits / temperature) in float32 over the last axis."""
  temperature = jnp.asarray(temperature, jnp.float32)
  return jax.nn.softmax(logits.astype(jnp.float32) / temperature[..., None], axis=-1)


CDF_BLOCK = 128


def normalized_cdf(probs: jax.Array) -> jax.Array:
  """CDF in token-id order, divided by its last entry (so it ends at exactly 1.0).

  Computed blockwise with two small triangular matmuls (within blocks of 128 ids, then across
  blocks): O(V * 128) multiply-adds that run on the matmul units, where XLA's cumsum of a long
  axis is a slow reduce_window on CPU. Summation order differs between entries, so the result
  may step down by an ulp at a tiny-probability token; the sampler does not rely on
  monotonicity, and `token_cdf_interval` accounts for it.
  """
  vocab = probs.shape[-1]
  blocks = -(-vocab // CDF_BLOCK)
  padded = jnp.pad(probs, [(0, 0)] * (probs.ndim - 1) + [(0, blocks * CDF_BLOCK - vocab)])
  padded = padded.reshape(*probs.shape[:-1], blocks, CDF_BLOCK)
  within = jnp.einsum('...nb,bc->...nc', padded,
                      jnp.triu(jnp.ones((CDF_BLOCK, CDF_BLOCK), probs.dtype)),
                      precision=jax.lax.Precision.HIGHEST)
  before = jnp.einsum('...n,nm->...m', within[..., -1],
                      jnp.triu(jnp.ones((blocks, blocks), probs.dtype), 1),
                      precision=jax.lax.Precision.HIGHEST)
  cdf = (within + before[..., None]).reshape(*probs.shape[:-1], blocks * CDF_BLOCK)[..., :vocab]
  return cdf / cdf[..., -1:]


# 'gumbel' is not a CDF order but the third way a noise picks a token (kforcing_jax/gumbel.py,
# the Gumbel-max coupling); it shares the field so that every place that samples with noise
# (AR decoding, stage targets, student readout, agreement, verification) uses the same rule
CDF_ORDERS = ('id', 'sorted', 'gumbel')


def check_order(order: str) -> str:
  if order not in CDF_ORDERS:
    raise ValueError(f'model.cdf_order={order!r}; expected one of {CDF_ORDERS}.')
  return order


def inverse_cdf_from_probs(probs: jax.Array, u: jax.Array, order: str = 'id') -> jax.Array:
  """The token of noise u: first v in `order` with CDF(v) > u and probs[v] > 0.
  probs: (..., V); u in [0, 1)."""
  # the result is an integer token: no gradient flows through it, and the sorted order's
  # bisection (nextafter) has no differentiation rule, so a loss that also reads the sampled
  # tokens (distill.distribution_loss) must not trace the sampler for its gradient
  probs, u = jax.lax.stop_gradient(probs), jax.lax.stop_gradient(u)
  if check_order(order) == 'sorted':
    return _sorted_sample(probs, u)
  if order == 'gumbel':
    return first_argmax(gumbel.scores(probs, u)).astype(jnp.int32)
  return _first_in_id_order(probs, u)


# ----------------------------------------------------------------------------- sorted order
# Without sorting: an argsort of a 8192-token row costs ~20x the id-order sampler on CPU. In
# descending-probability order the tokens of probability p occupy [A(p), A(p) + n(p) * p), A(p)
# the mass of all more likely tokens, ties laid out by id. So the sample of u has probability
# p* = the largest p with mass_at_least(p) > u (found by bisection on the float32 bit pattern,
# 31 masked sums over V), then the floor((u - A(p*)) / p*)-th tied id. Both sums run over
# the same masked row, so A(p*) equals mass_at_least of the next larger probability exactly and
# intervals never overlap; a token of probability 0 is never a candidate (p >= the smallest
# positive float).

def _blockwise_sum(x):
  """Sum over the last axis in blocks of CDF_BLOCK, then over blocks: rounding error grows
  with ~2 * sqrt(V) terms instead of V (a plain float32 reduce drifted 2e-5 at V = 8192)."""
  vocab = x.shape[-1]
  blocks = -(-vocab // CDF_BLOCK)
  x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, blocks * CDF_BLOCK - vocab)])
  return x.reshape(*x.shape[:-1], blocks, CDF_BLOCK).sum(-1).sum(-1)


def _mass_at_least(probs, t):
  return _blockwise_sum(jnp.where(probs >= t[..., None], probs, 0.0))


def _mass_above(probs, t):
  return _blockwise_sum(jnp.where(probs > t[..., None], probs, 0.0))


def _normalized(probs):
  """probs / their sum (the last CDF entry is then 1 up to rounding), and the sum."""
  probs = probs / _blockwise_sum(probs)[..., None]
  return probs, _blockwise_sum(probs)


def _sorted_sample(probs: jax.Array, u: jax.Array) -> jax.Array:
  probs, total = _normalized(probs.astype(jnp.float32))
  u = jnp.minimum(u, jnp.nextafter(total, 0.0))  # u -> 1: the least likely positive token
  bits = lambda x: jax.lax.bitcast_convert_type(x, jnp.float32)  # noqa: E731

  def halve(_, bounds):
    lo, hi = bounds                 # mass_at_least(bits(lo)) > u >= mass_at_least(bits(hi))
    mid = lo + (hi - lo) // 2
    ok = _mass_at_least(probs, bits(mid)) > u
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo = jnp.ones(u.shape, jnp.int32)                  # the smallest positive float32
  hi = jnp.full(u.shape, 0x3F800001, jnp.int32)      # just above 1.0
  lo, _ = jax.lax.fori_loop(0, 31, halve, (lo, hi))
  p = bits(lo)
  tied = probs == p[..., None]
  n_tied = jnp.sum(tied, axis=-1, dtype=jnp.int32)
  above = _mass_above(probs, p)
  j = jnp.floor((u - above) / p).astype(jnp.int32)
  # the division rounds: step to the tie whose [above + j p, above + (j+1) p) - computed as
  # `_sorted_interval` computes it - holds u
  j = j + (above + (j + 1) * p <= u) - (above + j * p > u)
  j = jnp.clip(j, 0, n_tied - 1)
  nth = tied & (jnp.cumsum(tied, axis=-1, dtype=jnp.int32) == (j + 1)[..., None])
  return jnp.argmax(nth, axis=-1).astype(jnp.int32)


def _sorted_interval(probs: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  probs, _ = _normalized(probs.astype(jnp.float32))
  p = jnp.take_along_axis(probs, tokens[..., None], axis=-1)[..., 0]
  ids = jnp.arange(probs.shape[-1], dtype=jnp.int32)
  earlier_ties = jnp.sum((probs == p[..., None]) & (ids < tokens[..., None]), axis=-1)
  lo = _mass_above(probs, p) + earlier_ties * p
  hi = jnp.where(p > 0, jnp.minimum(lo + p, _mass_at_least(probs, p)), lo)
  return lo, jnp.maximum(hi, lo)


def _first_in_id_order(probs: jax.Array, u: jax.Array) -> jax.Array:
  cdf = normalized_cdf(probs)
  positive = probs > 0
  hit = (cdf > u[..., None]) & positive
  vocab = probs.shape[-1]
  ids = jnp.arange(vocab, dtype=jnp.int32)
  first_hit = jnp.min(jnp.where(hit, ids, vocab), axis=-1)
  last_positive = jnp.max(jnp.where(positive, ids, -1), axis=-1)
  return jnp.where(first_hit < vocab, first_hit, last_positive).astype(jnp.int32)


# ----------------------------------------------------------------------------- student readout
# How a push-forward student turns slot i's logits into its token:
#   'argmax'       the paper's rule: the noise u_i enters only through the hint states and the
#                  token is the argmax of the slot's logits (the released checkpoints use it);
#   'inverse_cdf'  the slot's logits are a distribution over the token at t + i given the
#                  context and u_1..u_{i-1} (carried by the earlier hints), and the token is its
#                  inverse-CDF sample for u_i in model.cdf_order - the teacher's own rule. Still a
#                  deterministic push-forward of the noises; the student no longer has to carve
#                  the teacher's CDF intervals out of phi(u_i), only to predict distributions.
READOUTS = ('argmax', 'inverse_cdf')


def first_argmax(x):
  """jnp.argmax over the last axis (the first maximal index; the first NaN if any) as two plain
  reductions, a max and a min of indices. XLA:CPU lowers argmax to a variadic (value, index)
  reduce that it does not vectorise: at V = 8192 this form is ~3x faster (the id-order
  sampler's own pattern, `_first_in_id_order`)."""
  best = jnp.max(x, axis=-1, keepdims=True)
  ids = jnp.arange(x.shape[-1], dtype=jnp.int32)
  return jnp.min(jnp.where((x == best) | jnp.isnan(x), ids, x.shape[-1]), axis=-1)


def readout_tokens(logits: jax.Array, u: jax.Array, readout: str = 'argmax',
                   order: str = 'id') -> jax.Array:
  """A student's tokens (...,) from slot logits (..., V) and each slot's own noise u (...,)."""
  if readout == 'argmax':
    return first_argmax(logits).astype(jnp.int32)
  if readout == 'inverse_cdf':
    return inverse_cdf_sample(logits, u, 1.0, order)
  raise ValueError(f'model.readout={readout!r}; expected one of {READOUTS}.')


def student_tokens(cfg, logits: jax.Array, u: jax.Array) -> jax.Array:
  """`readout_tokens` with a student's own settings (a BackboneConfig: readout, cdf_order)."""
  return readout_tokens(logits, u, cfg.readout, cfg.cdf_order)


def inverse_cdf_sample(logits: jax.Array, u: jax.Array,
                       temperature: jax.Array | float = 1.0, order: str = 'id') -> jax.Array:
  """Token ids (...,) for logits (..., V) and uniforms u (...,) at `temperature`."""
  return inverse_cdf_from_probs(probabilities(logits, temperature), u, order)


def token_cdf_interval(probs: jax.Array, tokens: jax.Array,
                       order: str = 'id') -> tuple[jax.Array, jax.Array]:
  """[lo, hi): exactly the u that `inverse_cdf_from_probs` maps to `tokens` (same order).

  Token v is the first hit iff CDF(v) > u and no earlier positive-probability w has
  CDF(w) > u, so lo = max over those w of CDF(w) and hi = CDF(v); an interval with hi <= lo
  is empty (probability below float32 resolution). Used for noise inversion: u drawn in
  [lo, hi) reproduces the real token. In the sorted order the same holds on the permuted row,
  at the token's rank. probs: (..., V); tokens: (...,).
  """
  if check_order(order) == 'sorted':
    return _sorted_interval(probs, tokens)
  if order == 'gumbel':
    raise ValueError('model.cdf_order=gumbel: the noises of a token under the Gumbel-max '
                     'coupling are not an interval (noise inversion and the noise-map plot need '
                     'cdf_order=id or sorted).')
  return _interval_in_id_order(probs, tokens)


def id_order_intervals(probs: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[lo, hi) of every token (..., V) in the id order: what `token_cdf_interval` gives for
  each token, all at once (used by the soft k=1 targets)."""
  cdf = normalized_cdf(probs)
  reached = jax.lax.cummax(jnp.where(probs > 0, cdf, 0.0), axis=probs.ndim - 1)
  below = jnp.concatenate([jnp.zeros_like(cdf[..., :1]), reached[..., :-1]], axis=-1)
  return below, jnp.maximum(cdf, below)


def _interval_in_id_order(probs: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  lo, hi = id_order_intervals(probs)
  take = lambda x: jnp.take_along_axis(x, tokens[..., None], axis=-1)[..., 0]  # noqa: E731
  return take(lo), take(hi)
