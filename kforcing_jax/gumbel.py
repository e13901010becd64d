"""The Gumbel-max coupling: a scalar noise u picks argmax_v (log p_v + G_v(u)).

G(u) is a field of V Gumbel variables that is a deterministic function of u's float32 bits: a
32-bit integer hash of (bits(u), v) gives a uniform w_v in (0, 1) and G_v = -log(-log w_v). For u
uniform the w_v behave as independent uniforms, so the token is an exact sample of p (up to the
2^-24 resolution of w and the 2^24 distinct float32 noises in [0, 1)), like every inverse-CDF
order. What it buys is robustness: two nearby distributions p, q give the same token for the
same u with probability >= (1 - TV) / (1 + TV) (TV = total variation), where the inverse CDF's
tokens move whenever the CDF before them drifts by a token's width. A student that predicts a
distribution (model.readout=inverse_cdf) and reads it out by this coupling agrees with its
teacher nearly as often as the distributions allow (tests/test_gumbel.py; the recipe study's
phase 9). What it costs: the map from u to token has no order in u, so a later slot cannot read
an earlier slot's token off that slot's noise the way it can from a CDF (a step in u).

A token of probability 0 is never returned (its score is -inf); a row with one positive token
always returns it.
"""

import jax
import jax.numpy as jnp
import numpy as np

# odd multipliers of the integer finaliser (an xorshift-multiply mix with full avalanche) and
# the golden-ratio step that separates token ids before mixing
_MIX_1 = 0x7FEB352D
_MIX_2 = 0x846CA68B
_TOKEN_STEP = 0x9E3779B9


def _mix(x):
  """32-bit finaliser on uint32 arrays (jnp or np: the same wrapping arithmetic)."""
  word = np.uint32   # constants typed as uint32 (a Python int above 2^31 is no jax scalar)
  x = x ^ (x >> word(16))
  x = x * word(_MIX_1)
  x = x ^ (x >> word(15))
  x = x * word(_MIX_2)
  return x ^ (x >> word(16))


def uniform_field(u: jax.Array, vocab: int) -> jax.Array:
  """(..., V) uniforms in (0, 1), float32: w_v = (top 24 bits of hash(bits(u), v) + 1/2) / 2^24."""
  bits = jax.lax.bitcast_convert_type(u.astype(jnp.float32), jnp.uint32)
  ids = jnp.arange(vocab, dtype=jnp.uint32)
  h = _mix(_mix(bits)[..., None] + ids * jnp.uint32(_TOKEN_STEP))
  return ((h >> 8).astype(jnp.float32) + 0.5) * jnp.float32(2.0 ** -24)


def gumbel_field(u: jax.Array, vocab: int) -> jax.Array:
  """(..., V) Gumbel variables G_v(u) = -log(-log w_v), float32."""
  return -jnp.log(-jnp.log(uniform_field(u, vocab)))


def scores(probs: jax.Array, u: jax.Array) -> jax.Array:
  """(..., V) log p + G(u) for probabilities (..., V) and noises u (...,): the coupling's token
  is their first maximal index (sampling.inverse_cdf_from_probs takes it). Zero-probability
  tokens score -inf and never win."""
  log_p = jnp.where(probs > 0, jnp.log(jnp.where(probs > 0, probs, 1.0)), -jnp.inf)
  return log_p + gumbel_field(u, probs.shape[-1])


def reference_sample(probs: np.ndarray, u: np.ndarray) -> np.ndarray:
  """The same coupling in numpy float64 (the hash is integer arithmetic and identical; only the
  logs are in float64): what tests compare the sampler with."""
  probs = np.asarray(probs, np.float64)
  bits = np.asarray(u, np.float32).view(np.uint32)
  ids = np.arange(probs.shape[-1], dtype=np.uint32)
  with np.errstate(over='ignore'):
    h = _mix(_mix(bits)[..., None] + ids * np.uint32(_TOKEN_STEP))
  w = ((h >> np.uint32(8)).astype(np.float64) + 0.5) * 2.0 ** -24
  with np.errstate(divide='ignore'):
    scores = np.where(probs > 0, np.log(probs), -np.inf) - np.log(-np.log(w))
  return np.argmax(scores, axis=-1).astype(np.int32)
