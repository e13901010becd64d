"""Attention kernels against a dense, explicitly masked float64 reference (METHOD.md s.2-3).

The reference builds the whole sequence [N context | T*W window slots] and the boolean
(N + T*W)^2 mask from METHOD.md's rules, and runs plain softmax attention in numpy float64.
The reference mask itself is pinned by a literal staircase for N = 3, k = 2.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kforcing_jax.models import attention

TOL = 1e-5
# jit once per shape: op-by-op dispatch would compile every primitive separately.
# the reference works on (B, S, H, Dh) context arrays; window_attention takes them head-major
window_attention = jax.jit(lambda q, k, v, ck, cv, ctx_len: attention.window_attention(
    q, k, v, jnp.swapaxes(ck, 1, 2), jnp.swapaxes(cv, 1, 2), ctx_len))
causal_attention = jax.jit(attention.causal_attention)
apply_rope = jax.jit(attention.apply_rope)


# ---------------------------------------------------------------------------------------------
# dense reference


def reference_mask(num_ctx, num_windows, width, ctx_len):
  """Boolean (L, L) mask, L = num_ctx + num_windows * width, True = may attend.

  Rows/columns: context positions 0..num_ctx-1, then slot (t, i) at num_ctx + t * width + i.
  Context row t sees context s <= t. Slot (t, i) sees context s < ctx_len[t] and the slots
  (t, i') with i' <= i of its own window only.
  """
  ctx_len = np.broadcast_to(np.asarray(ctx_len), (num_windows,))
  size = num_ctx + num_windows * width
  mask = np.zeros((size, size), bool)
  for t in range(num_ctx):
    for s in range(num_ctx):
      mask[t, s] = s <= t
  for t in range(num_windows):
    for i in range(width):
      row = num_ctx + t * width + i
      for s in range(num_ctx):
        mask[row, s] = s < ctx_len[t]
      for i2 in range(i + 1):
        mask[row, num_ctx + t * width + i2] = True
  return mask


def dense_attention(q, k, v, mask):
  """Plain softmax attention in float64. q, k, v: (L, H, Dh); mask (L, L)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  scores = np.einsum('qhd,khd->hqk', q, k) / np.sqrt(q.shape[-1])
  scores = np.where(mask[None], scores, -np.inf)
  scores -= scores.max(-1, keepdims=True)
  probs = np.exp(scores)
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum('hqk,khd->qhd', probs, v)


def test_reference_mask_is_the_staircase():
  # N = 3 context tokens, k = 2 hints per position; hint (t, i) at row 3 + 2 t + (i - 1).
  expected = np.array([
      # c0 c1 c2 | h01 h02 h11 h12 h21 h22
      [1, 0, 0, 0, 0, 0, 0, 0, 0],  # c0
      [1, 1, 0, 0, 0, 0, 0, 0, 0],  # c1
      [1, 1, 1, 0, 0, 0, 0, 0, 0],  # c2
      [1, 0, 0, 1, 0, 0, 0, 0, 0],  # hint (0, 1)
      [1, 0, 0, 1, 1, 0, 0, 0, 0],  # hint (0, 2)
      [1, 1, 0, 0, 0, 1, 0, 0, 0],  # hint (1, 1)
      [1, 1, 0, 0, 0, 1, 1, 0, 0],  # hint (1, 2)
      [1, 1, 1, 0, 0, 0, 0, 1, 0],  # hint (2, 1)
      [1, 1, 1, 0, 0, 0, 0, 1, 1],  # hint (2, 2)
  ], bool)
  np.testing.assert_array_equal(reference_mask(3, 3, 2, np.arange(1, 4)), expected)


def _random(rng, *shape):
  return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize('b,n,w,h,dh', [(2, 5, 3, 2, 8), (1, 7, 4, 3, 4), (2, 4, 1, 1, 16)])
def test_window_attention_training_layout(b, n, w, h, dh):
  # One window per context position t, window t sees context s <= t (ctx_len = t + 1).
  rng = np.random.default_rng(n * 100 + w)
  qc, kc, vc = (_random(rng, b, n, h, dh) for _ in range(3))
  qw, kw, vw = (_random(rng, b, n, w, h, dh) for _ in range(3))
  ctx_len = np.arange(1, n + 1)[None, :]
  got_w = np.asarray(window_attention(qw, kw, vw, kc, vc, jnp.asarray(ctx_len)))
  got_c = np.asarray(causal_attention(qc, kc, vc))
  mask = reference_mask(n, n, w, ctx_len[0])
  for bi in range(b):
    cat = lambda c, x: np.concatenate([c[bi], x[bi].reshape(n * w, h, dh)], 0)  # noqa: E731
    want = dense_attention(cat(qc, qw), cat(kc, kw), cat(vc, vw), mask)
    np.testing.assert_allclose(got_c[bi], want[:n], atol=TOL, rtol=TOL)
    np.testing.assert_allclose(got_w[bi], want[n:].reshape(n, w, h, dh), atol=TOL, rtol=TOL)


@pytest.mark.parametrize('ctx_len,num_windows', [(4, 1), (9, 1), (1, 2), (6, 3)])
def test_window_attention_decode_layout(ctx_len, num_windows):
  # A scalar ctx_len against a longer (partly filled) KV cache: positions >= ctx_len are
  # garbage that must be invisible.
  rng = np.random.default_rng(ctx_len)
  b, n, w, h, dh = 2, 9, 3, 2, 8
  kc, vc = _random(rng, b, n, h, dh) * 3, _random(rng, b, n, h, dh) * 3
  qw, kw, vw = (_random(rng, b, num_windows, w, h, dh) for _ in range(3))
  got = np.asarray(window_attention(qw, kw, vw, kc, vc, jnp.int32(ctx_len)))
  mask = reference_mask(n, num_windows, w, ctx_len)
  qc = np.zeros_like(kc)  # context rows are not compared here
  for bi in range(b):
    cat = lambda c, x: np.concatenate(  # noqa: E731
        [c[bi], x[bi].reshape(num_windows * w, h, dh)], 0)
    want = dense_attention(cat(qc, qw), cat(kc, kw), cat(vc, vw), mask)
    np.testing.assert_allclose(got[bi], want[n:].reshape(num_windows, w, h, dh),
                               atol=TOL, rtol=TOL)


def test_window_attention_per_sequence_ctx_len():
  # ctx_len of shape (B, 1): each sequence of the batch has its own cache length.
  rng = np.random.default_rng(0)
  b, n, w, h, dh = 3, 8, 2, 2, 4
  kc, vc = _random(rng, b, n, h, dh), _random(rng, b, n, h, dh)
  qw, kw, vw = (_random(rng, b, 2, w, h, dh) for _ in range(3))
  lens = np.array([[2], [8], [5]])
  got = np.asarray(window_attention(qw, kw, vw, kc, vc, jnp.asarray(lens)))
  for bi in range(b):
    mask = reference_mask(n, 2, w, lens[bi, 0])
    cat = lambda c, x: np.concatenate([c[bi], x[bi].reshape(2 * w, h, dh)], 0)  # noqa: E731
    want = dense_attention(cat(np.zeros_like(kc), qw), cat(kc, kw), cat(vc, vw), mask)
    np.testing.assert_allclose(got[bi], want[n:].reshape(2, w, h, dh), atol=TOL, rtol=TOL)


def test_window_attention_ignores_invisible_keys():
  # Independent of the reference: changing context keys/values at s >= ctx_len, or window
  # slots after i, must not change slot i's output.
  rng = np.random.default_rng(1)
  b, n, w, h, dh = 1, 6, 3, 2, 4
  kc, vc = _random(rng, b, n, h, dh), _random(rng, b, n, h, dh)
  qw, kw, vw = (_random(rng, b, n, w, h, dh) for _ in range(3))
  ctx_len = jnp.arange(1, n + 1)[None]
  base = np.asarray(window_attention(qw, kw, vw, kc, vc, ctx_len))
  kc2, vc2 = kc.copy(), vc.copy()
  kc2[:, 3:], vc2[:, 3:] = 10.0, -10.0
  moved = np.asarray(window_attention(qw, kw, vw, kc2, vc2, ctx_len))
  np.testing.assert_array_equal(moved[:, :3], base[:, :3])
  assert np.abs(moved[:, 3:] - base[:, 3:]).max() > 1e-2
  kw2, vw2 = kw.copy(), vw.copy()
  kw2[:, :, 2], vw2[:, :, 2] = 10.0, -10.0
  moved = np.asarray(window_attention(qw, kw2, vw2, kc, vc, ctx_len))
  np.testing.assert_array_equal(moved[:, :, :2], base[:, :, :2])
  assert np.abs(moved[:, :, 2] - base[:, :, 2]).max() > 1e-2


@pytest.mark.parametrize('b,s,h,dh', [(2, 7, 2, 8), (1, 16, 4, 4)])
def test_causal_attention_matches_dense_reference(b, s, h, dh):
  rng = np.random.default_rng(s)
  q, k, v = (_random(rng, b, s, h, dh) for _ in range(3))
  got = np.asarray(causal_attention(q, k, v))
  mask = np.tril(np.ones((s, s), bool))
  for bi in range(b):
    np.testing.assert_allclose(got[bi], dense_attention(q[bi], k[bi], v[bi], mask),
                               atol=TOL, rtol=TOL)


# ---------------------------------------------------------------------------------------------
# RoPE


def reference_rope(x, positions, base=10000.0):
  """Rotate-half RoPE in float64: channel j pairs with j + Dh/2. x (..., S, H, Dh), pos (S,)."""
  x = np.asarray(x, np.float64)
  dh = x.shape[-1]
  half = dh // 2
  inv_freq = base ** (-2.0 * np.arange(half) / dh)
  ang = np.asarray(positions, np.float64)[:, None] * inv_freq  # (S, Dh/2)
  cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
  out = np.empty_like(x)
  out[..., :half] = x[..., :half] * cos - x[..., half:] * sin
  out[..., half:] = x[..., half:] * cos + x[..., :half] * sin
  return out


def test_rope_inverse_frequencies():
  np.testing.assert_allclose(np.asarray(attention.rope_inverse_frequencies(4)), [1.0, 0.01],
                             rtol=1e-6)
  dh = 64
  np.testing.assert_allclose(np.asarray(attention.rope_inverse_frequencies(dh)),
                             10000.0 ** (-np.arange(0, dh, 2) / dh), rtol=1e-6)


def test_rope_matches_rotate_half_reference():
  rng = np.random.default_rng(0)
  x = _random(rng, 2, 40, 3, 16)
  pos = np.arange(40) * 3 + 1
  got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos)[None]))
  np.testing.assert_allclose(got, reference_rope(x, pos), atol=5e-5, rtol=1e-5)


def test_rope_pairs_j_with_j_plus_half():
  # A vector with only channel 1 set rotates into channel 1 + Dh/2, never into channel 0 or 2
  # (which interleaved RoPE would use).
  dh = 8
  x = np.zeros((1, 1, 1, dh), np.float32)
  x[..., 1] = 1.0
  got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray([[5]])))[0, 0, 0]
  angle = 5 * 10000.0 ** (-2 / dh)
  expected = np.zeros(dh)
  expected[1], expected[1 + dh // 2] = np.cos(angle), np.sin(angle)
  np.testing.assert_allclose(got, expected, atol=1e-6)


def test_rope_window_positions_shape():
  # The student calls it with (B, T, W, H, Dh) and positions (1, T, W).
  rng = np.random.default_rng(2)
  x = _random(rng, 2, 3, 4, 2, 8)
  pos = np.arange(3)[:, None] + np.arange(1, 5)[None, :]
  got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos)[None]))
  want = reference_rope(x.reshape(2, 12, 2, 8), pos.reshape(-1)).reshape(x.shape)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_rope_scores_depend_only_on_position_difference():
  rng = np.random.default_rng(3)
  q, k = _random(rng, 1, 1, 1, 32), _random(rng, 1, 1, 1, 32)

  def score(m, n):
    qr = apply_rope(jnp.asarray(q), jnp.asarray([[m]]))
    kr = apply_rope(jnp.asarray(k), jnp.asarray([[n]]))
    return float(jnp.sum(qr * kr))

  for diff in (0, 1, 5, 17):
    scores = [score(n + diff, n) for n in (0, 3, 20, 100)]
    np.testing.assert_allclose(scores, scores[0], atol=1e-4, rtol=1e-4)
  # ... and does depend on it.
  assert abs(score(5, 0) - score(0, 0)) > 1e-2
  assert abs(score(0, 0) - float(np.sum(q * k))) < 1e-5


@pytest.mark.parametrize('kv_heads', [2, 1])  # multi-head, grouped-query
@pytest.mark.parametrize('drop', [1, 3, 5])
def test_window_attention_with_only_the_last_queries_matches_the_dense_reference(kv_heads, drop):
  """A decode step's last layer asks outputs of the hint slots only: the queries are the last
  W - drop slots, keys and values all W; each output equals that slot's row of the dense
  float64 reference (mask = the staircase, keys expanded to every query head)."""
  rng = np.random.default_rng(drop * 10 + kv_heads)
  b, n, w, h, dh, ctx_len = 2, 9, 6, 2, 8, 7
  kc, vc = _random(rng, b, n, kv_heads, dh), _random(rng, b, n, kv_heads, dh)
  qw = _random(rng, b, 1, w, h, dh)
  kw, vw = _random(rng, b, 1, w, kv_heads, dh), _random(rng, b, 1, w, kv_heads, dh)
  got = np.asarray(window_attention(qw[:, :, drop:], kw, vw, kc, vc, jnp.int32(ctx_len)))
  assert got.shape == (b, 1, w - drop, h, dh)
  mask = reference_mask(n, 1, w, ctx_len)
  expand = lambda x: np.repeat(x, h // kv_heads, axis=-2)  # noqa: E731  (head j -> j // G)
  for bi in range(b):
    cat = lambda c, x: np.concatenate([c[bi], x[bi].reshape(w, -1, dh)], 0)  # noqa: E731
    want = dense_attention(cat(np.zeros((b, n, h, dh)), qw), expand(cat(kc, kw)),
                           expand(cat(vc, vw)), mask)
    np.testing.assert_allclose(got[bi, 0], want[n + drop:], atol=TOL, rtol=TOL)
