"""Teacher backbone and PFLM student (METHOD.md s.2-3), on a tiny model.

The output head is zero-initialised, so every test that compares logits first replaces the
head by random values (otherwise all logits would be equal and the comparison vacuous).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from kforcing_jax.models import BackboneConfig, FunctionalModel
from kforcing_jax.models.pflm import sinusoidal_features

B, N, K = 2, 6, 3
CFG = BackboneConfig(vocab_size=64, num_real_tokens=60, mask_id=0, d_model=32, num_layers=2,
                     num_heads=4)


def _random_head(backbone_params, key):
  kh, kb = jax.random.split(key)
  d, v = backbone_params['head'].shape
  backbone_params = dict(backbone_params)
  backbone_params['head'] = 2.0 * d ** -0.5 * jax.random.normal(kh, (d, v))
  backbone_params['head_bias'] = 0.5 * jax.random.normal(kb, (v,))
  return backbone_params


@pytest.fixture(scope='module')
def models():
  ar = FunctionalModel(CFG, 'ar')
  st = FunctionalModel(CFG, 'pflm', k_max=K)
  p = _random_head(ar.init(jax.random.key(0)), jax.random.key(10))
  ps = dict(st.init(jax.random.key(1)))
  ps['backbone'] = p  # the student starts as the teacher plus a noise encoder
  return ar, st, p, ps


@pytest.fixture(scope='module')
def batch():
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(1, CFG.num_real_tokens, (B, N)), jnp.int32)
  u = jnp.asarray(rng.random((B, N, K), dtype=np.float32))
  tau = jnp.asarray([1.0, 0.7], jnp.float32)
  return tokens, u, tau


def _ar_forward(model):
  return jax.jit(lambda params, tokens: model.module(params)(tokens))


def _student_forward(model):
  return jax.jit(lambda params, tokens, u, tau: model.module(params)(tokens, u, tau))


@pytest.fixture(scope='module')
def forwards(models):
  ar, st, _, _ = models
  return _ar_forward(ar), _student_forward(st)


# ---------------------------------------------------------------------------------------------
# the context stream is the teacher


def test_student_context_stream_is_the_teacher(models, batch, forwards):
  _, _, p, ps = models
  tokens, u, tau = batch
  ar_fwd, st_fwd = forwards
  _, ar_kvs = ar_fwd(p, tokens)
  hints_a, kvs_a = st_fwd(ps, tokens, u, tau)
  hints_b, kvs_b = st_fwd(ps, tokens, jnp.flip(u, -1) * 0.5, tau * 2)
  assert len(kvs_a) == len(ar_kvs) == CFG.num_layers
  for layer in range(CFG.num_layers):
    for j in range(2):  # k, v
      np.testing.assert_allclose(np.asarray(kvs_a[layer][j]), np.asarray(ar_kvs[layer][j]),
                                 atol=1e-6, rtol=1e-6)
      np.testing.assert_array_equal(np.asarray(kvs_a[layer][j]), np.asarray(kvs_b[layer][j]))
  # u and tau do reach the hint logits.
  assert np.abs(np.asarray(hints_a) - np.asarray(hints_b)).max() > 1e-2


# ---------------------------------------------------------------------------------------------
# hint logits


def test_hint_logits_equal_prefix_forward(models, batch, forwards):
  # Window t computed with only tokens[:, :t+1] as context (the student called on the prefix,
  # window t = its last position) equals window t of the all-windows forward.
  _, _, _, ps = models
  tokens, u, tau = batch
  _, st_fwd = forwards
  full, _ = st_fwd(ps, tokens, u, tau)
  for t in (0, 3):  # t = N - 1 would be the full sequence itself
    prefix, _ = st_fwd(ps, tokens[:, :t + 1], u[:, :t + 1], tau)
    np.testing.assert_allclose(np.asarray(prefix[:, t]), np.asarray(full[:, t]),
                               atol=1e-5, rtol=1e-5)


def test_hint_logits_equal_decode_step_against_a_cache(models, batch, forwards):
  # The decode way: a KV cache of the whole sequence (entries >= t+1 are "future" and must be
  # invisible), one window of k hints at RoPE positions t+1..t+k, scalar ctx_len = t+1.
  _, st, _, ps = models
  tokens, u, tau = batch
  _, st_fwd = forwards
  full, _ = st_fwd(ps, tokens, u, tau)

  @jax.jit
  def decode_window(params, tokens, u_t, tau, t):
    m = st.module(params)
    _, cache = m.backbone(tokens)
    hints = m.hint_states(u_t, tau[:, None])[:, None]  # (B, 1, k, D)
    positions = (t + jnp.arange(1, u_t.shape[-1] + 1))[None, None]
    x, _ = m.backbone.window_stream(hints, positions, cache, t + 1)
    return m.backbone.logits(x)[:, 0]

  for t in range(N):
    got = decode_window(ps, tokens, u[:, t], tau, jnp.int32(t))
    np.testing.assert_allclose(np.asarray(got), np.asarray(full[:, t]), atol=1e-5, rtol=1e-5)
  # Not vacuous: the wrong RoPE positions (t..t+k-1) give different logits.
  m_wrong = jax.jit(lambda params: _shifted_positions_window(st, params, tokens, u, tau))
  assert np.abs(np.asarray(m_wrong(ps)) - np.asarray(full[:, 2])).max() > 1e-3


def test_window_stream_outputs_from_drops_only_unread_rows(models, batch):
  """A decode step's pending tokens stop at their K/V in the last layer (outputs_from): the
  kept slots' final states and every layer's window K/V of all slots equal the full stream's
  to float32 rounding (XLA fuses the two programs differently)."""
  _, st, _, ps = models
  tokens, u, tau = batch
  t = 3

  def stream(params, outputs_from):
    m = st.module(params)
    _, cache = m.backbone(tokens)
    slots = jnp.concatenate([m.backbone.embed_tokens(tokens[:, :K]),
                             m.hint_states(u[:, t], tau[:, None])], axis=1)[:, None]
    positions = (t + jnp.arange(1, 2 * K + 1))[None, None]
    return m.backbone.window_stream(slots, positions, cache, t + 1, outputs_from)

  stream = jax.jit(stream, static_argnums=1)
  full, full_kvs = stream(ps, 0)
  kept, kvs = stream(ps, K)
  assert kept.shape[2] == K and full.shape[2] == 2 * K
  np.testing.assert_allclose(np.asarray(kept), np.asarray(full[:, :, K:]), atol=1e-5, rtol=1e-5)
  for (k_full, v_full), (k_kept, v_kept) in zip(full_kvs, kvs):
    np.testing.assert_allclose(np.asarray(k_kept), np.asarray(k_full), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(v_kept), np.asarray(v_full), atol=1e-5, rtol=1e-5)


def _shifted_positions_window(st, params, tokens, u, tau, t=2):
  m = st.module(params)
  _, cache = m.backbone(tokens)
  hints = m.hint_states(u[:, t], tau[:, None])[:, None]
  positions = (t + jnp.arange(K))[None, None]
  x, _ = m.backbone.window_stream(hints, positions, cache, t + 1)
  return m.backbone.logits(x)[:, 0]


def test_hint_logits_do_not_see_future_tokens(models, batch, forwards):
  _, _, _, ps = models
  tokens, u, tau = batch
  _, st_fwd = forwards
  full, _ = st_fwd(ps, tokens, u, tau)
  t = 2
  perturbed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 7) % (CFG.num_real_tokens - 1) + 1)
  moved, _ = st_fwd(ps, perturbed, u, tau)
  np.testing.assert_allclose(np.asarray(moved[:, :t + 1]), np.asarray(full[:, :t + 1]),
                             atol=1e-6, rtol=1e-6)
  assert np.abs(np.asarray(moved[:, t + 1:]) - np.asarray(full[:, t + 1:])).max() > 1e-3


def test_hint_slot_sees_only_earlier_slots_of_its_own_window(models, batch, forwards):
  # Changing u[t, i] changes slot (t, i) and later slots of window t, nothing else.
  _, _, _, ps = models
  tokens, u, tau = batch
  _, st_fwd = forwards
  full = np.asarray(st_fwd(ps, tokens, u, tau)[0])
  t, i = 3, 1
  moved = np.asarray(st_fwd(ps, tokens, u.at[:, t, i].set(1.0 - u[:, t, i]), tau)[0])
  changed = np.abs(moved - full).max(axis=(0, 3)) > 1e-4  # (N, K)
  expected = np.zeros((N, K), bool)
  expected[t, i:] = True
  np.testing.assert_array_equal(changed, expected)


def test_narrower_window_uses_the_first_slots(models, batch, forwards):
  # A k_max-wide student decodes with k < k_max by using the first k slots.
  _, _, _, ps = models
  tokens, u, tau = batch
  _, st_fwd = forwards
  full, _ = st_fwd(ps, tokens, u, tau)
  narrow, _ = st_fwd(ps, tokens, u[..., :2], tau)
  assert narrow.shape == (B, N, 2, CFG.vocab_size)
  np.testing.assert_allclose(np.asarray(narrow), np.asarray(full[..., :2, :]),
                             atol=1e-5, rtol=1e-5)


def test_mask_id_and_padding_logits_are_masked(models, batch, forwards):
  _, _, p, ps = models
  tokens, u, tau = batch
  ar_fwd, st_fwd = forwards
  ar_logits, _ = ar_fwd(p, tokens)
  hint_logits, _ = st_fwd(ps, tokens, u, tau)
  for logits in (np.asarray(ar_logits), np.asarray(hint_logits)):
    assert logits.shape[-1] == CFG.vocab_size
    np.testing.assert_array_equal(logits[..., CFG.mask_id], -1000.0)
    np.testing.assert_array_equal(logits[..., CFG.num_real_tokens:], -1000.0)
    real = np.delete(np.arange(CFG.num_real_tokens), CFG.mask_id)
    assert np.all(np.abs(logits[..., real]) < 100)
    assert np.std(logits[..., real]) > 0.1  # the random head makes them informative


# ---------------------------------------------------------------------------------------------
# noise encoder


def test_sinusoidal_features_match_float64():
  dim = 32
  s = np.array([0.0, 1e-4, 0.1234567, 0.5, 0.999999, 1.0, 0.7, 2.0])
  got = np.asarray(sinusoidal_features(jnp.asarray(s, jnp.float32), dim))
  half = dim // 2
  f = 10000.0 ** (-np.arange(half) / half)
  ang = 2 * np.pi * s[:, None] * f[None, :]
  want = np.concatenate([np.cos(ang), np.sin(ang)], axis=-1)
  assert got.shape == (len(s), dim)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_noise_encoder_matches_float64_reference(models):
  _, st, _, ps = models
  enc = {k: np.asarray(v, np.float64) for k, v in ps['noise_encoder'].items()}
  d = CFG.d_model
  enc['norm_scale'] = 1.0 + 0.3 * np.random.default_rng(1).standard_normal(d)
  enc['norm_bias'] = 0.3 * np.random.default_rng(2).standard_normal(d)
  enc['proj_bias'] = 0.3 * np.random.default_rng(3).standard_normal(d)
  params = dict(ps)
  params['noise_encoder'] = {k: jnp.asarray(v, jnp.float32) for k, v in enc.items()}
  u = np.array([[0.0, 0.25, 0.9], [0.5, 0.01, 0.99]])
  tau = np.array([1.0, 0.5])
  got = np.asarray(jax.jit(lambda prm, u, tau: st.module(prm).noise_encoder(u, tau[:, None]))(
      params, jnp.asarray(u, jnp.float32), jnp.asarray(tau, jnp.float32)))

  def phi(s):
    f = 10000.0 ** (-np.arange(d // 2) / (d // 2))
    a = 2 * np.pi * s[..., None] * f
    return np.concatenate([np.cos(a), np.sin(a)], -1)

  feats = np.concatenate([phi(u), phi(np.broadcast_to(tau[:, None], u.shape))], -1)
  z = feats @ enc['proj'] + enc['proj_bias']
  mu, var = z.mean(-1, keepdims=True), z.var(-1, keepdims=True)
  h = (z - mu) / np.sqrt(var + 1e-5) * enc['norm_scale'] + enc['norm_bias']
  h = h @ enc['mlp_in'] + enc['mlp_in_bias']
  h = 0.5 * h * (1 + special.erf(h / math.sqrt(2)))  # exact GELU
  want = z + h @ enc['mlp_out'] + enc['mlp_out_bias']
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# bfloat16 compute


def test_bfloat16_compute_is_close_and_params_stay_float32(models, batch, forwards):
  _, _, p, ps = models
  tokens, u, tau = batch
  ar_fwd, st_fwd = forwards
  cfg16 = BackboneConfig(**{**CFG.__dict__, 'dtype': 'bfloat16'})
  ar16 = FunctionalModel(cfg16, 'ar')
  st16 = FunctionalModel(cfg16, 'pflm', k_max=K)
  for params in (ar16.init(jax.random.key(0)), st16.init(jax.random.key(1))):
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}

  logits32, kvs32 = ar_fwd(p, tokens)
  logits16, kvs16 = _ar_forward(ar16)(p, tokens)
  assert kvs16[0][0].dtype == jnp.bfloat16 and kvs32[0][0].dtype == jnp.float32
  assert logits16.dtype == jnp.float32
  hints32, _ = st_fwd(ps, tokens, u, tau)
  hints16, _ = _student_forward(st16)(ps, tokens, u, tau)
  for a32, a16 in ((logits32, logits16), (hints32, hints16)):
    a32, a16 = np.asarray(a32), np.asarray(a16)
    err = np.abs(a32 - a16).max()
    assert err < 0.1 * np.abs(a32[..., 1:CFG.num_real_tokens]).max(), err
    assert err > 0  # it really ran in bfloat16
    np.testing.assert_array_equal(a16[..., CFG.mask_id], -1000.0)


def test_noise_scale_multiplies_u_before_the_features():
  # the encoder with scale s on u equals the scale-1 encoder on s * u (same weights)
  from kforcing_jax.models.pflm import NoiseEncoder
  from flax import nnx
  enc1 = NoiseEncoder(32, nnx.Rngs(0), noise_scale=1.0)
  enc100 = NoiseEncoder(32, nnx.Rngs(0), noise_scale=100.0)
  u = jnp.linspace(0.0, 0.01, 7)
  np.testing.assert_allclose(np.asarray(enc100(u, jnp.ones(()))),
                             np.asarray(enc1(100.0 * u, jnp.ones(()))), rtol=1e-5, atol=1e-5)
  assert not np.allclose(np.asarray(enc100(u, jnp.ones(()))), np.asarray(enc1(u, jnp.ones(()))))
