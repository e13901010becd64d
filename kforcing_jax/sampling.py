"""Inverse-CDF sampling with explicit uniforms: the map (distribution, u) -> token.

The AR teacher's sample for noise u is the smallest token id v with CDF(v) > u, the CDF being
the cumulative sum of probabilities in token-id order. The same function produces the AR
decoder's samples and the k=1 distillation targets, so both agree token for token.

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
and is what makes u = 0 skip leading zero-probability tokens.
"""

import jax
import jax.numpy as jnp


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


def inverse_cdf_from_probs(probs: jax.Array, u: jax.Array) -> jax.Array:
  """First v (in id order) with CDF(v) > u and probs[v] > 0. probs: (..., V); u in [0, 1)."""
  cdf = normalized_cdf(probs)
  positive = probs > 0
  hit = (cdf > u[..., None]) & positive
  vocab = probs.shape[-1]
  ids = jnp.arange(vocab, dtype=jnp.int32)
  first_hit = jnp.min(jnp.where(hit, ids, vocab), axis=-1)
  last_positive = jnp.max(jnp.where(positive, ids, -1), axis=-1)
  return jnp.where(first_hit < vocab, first_hit, last_positive).astype(jnp.int32)


def inverse_cdf_sample(logits: jax.Array, u: jax.Array,
                       temperature: jax.Array | float = 1.0) -> jax.Array:
  """Token ids (...,) for logits (..., V) and uniforms u (...,) at `temperature`."""
  return inverse_cdf_from_probs(probabilities(logits, temperature), u)


def token_cdf_interval(probs: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[lo, hi): exactly the u that `inverse_cdf_from_probs` maps to `tokens` (same id order).

  Token v is the first hit iff CDF(v) > u and no earlier positive-probability w has
  CDF(w) > u, so lo = max over those w of CDF(w) and hi = CDF(v); an interval with hi <= lo
  is empty (probability below float32 resolution). Used for noise inversion: u drawn in
  [lo, hi) reproduces the real token.
  """
  cdf = normalized_cdf(probs)
  reached = jax.lax.cummax(jnp.where(probs > 0, cdf, 0.0), axis=probs.ndim - 1)
  below = jnp.concatenate([jnp.zeros_like(cdf[..., :1]), reached[..., :-1]], axis=-1)
  hi = jnp.take_along_axis(cdf, tokens[..., None], axis=-1)[..., 0]
  lo = jnp.take_along_axis(below, tokens[..., None], axis=-1)[..., 0]
  return lo, jnp.maximum(hi, lo)
