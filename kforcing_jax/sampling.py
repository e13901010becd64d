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
    entry is exactly 1.0, and the last positive token is the fallback);
  * elsewhere it agrees with a float64 reference except for u within ~1e-6 of an interval
    edge (tests/test_sampling.py measures this).
METHOD.md writes "smallest v with CDF(v) >= u"; ">" differs only for u exactly on an edge
and is what makes u = 0 skip leading zero-probability tokens.
"""

import jax
import jax.numpy as jnp


def probabilities(logits: jax.Array, temperature: jax.Array | float = 1.0) -> jax.Array:
  """softmax(logits / temperature) in float32 over the last axis."""
  temperature = jnp.asarray(temperature, jnp.float32)
  return jax.nn.softmax(logits.astype(jnp.float32) / temperature[..., None], axis=-1)


def monotone_cdf(probs: jax.Array) -> jax.Array:
  """CDF in token-id order, normalised to end at exactly 1.0 and made non-decreasing.

  XLA may compute each prefix sum separately (reduce_window), so a float32 cumsum can step
  DOWN by one ulp at a tiny-probability token; the running max removes that, which is what
  makes the sampler and `token_cdf_interval` describe the same u-intervals.
  """
  cdf = jnp.cumsum(probs, axis=-1)
  return jax.lax.cummax(cdf / cdf[..., -1:], axis=probs.ndim - 1)


def inverse_cdf_from_probs(probs: jax.Array, u: jax.Array) -> jax.Array:
  """Smallest v with CDF(v) > u and probs[v] > 0. probs: (..., V); u: (...) in [0, 1)."""
  cdf = monotone_cdf(probs)
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
  """[lo, hi): the u-interval that `inverse_cdf_from_probs` maps to `tokens` (same id order).

  Used for noise inversion: u drawn uniformly in [lo, hi) reproduces the real token.
  """
  cdf = monotone_cdf(probs)
  below = jnp.concatenate([jnp.zeros_like(cdf[..., :1]), cdf[..., :-1]], axis=-1)
  hi = jnp.take_along_axis(cdf, tokens[..., None], axis=-1)[..., 0]
  lo = jnp.take_along_axis(below, tokens[..., None], axis=-1)[..., 0]
  return lo, hi
