"""Grouped-query attention (model.num_kv_heads < num_heads): the same function as multi-head
attention whose K/V heads are repeated per group, in the full forward, the cached AR decode,
the student's window stream and the ragged lossless loop; a cache Hkv heads wide."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test_tiny
from kforcing_jax import decode, lossless, models, ragged
from tests.helpers import params as params_lib

HEADS, KV_HEADS = 4, 2
PREFIX, GEN = 5, 14


def config(kv_heads: int):
  c = test_tiny.get_config()
  c.model.vocab_size = 64
  c.model.num_heads = HEADS
  c.model.num_kv_heads = kv_heads
  return c


def as_multi_head(params: dict, kind: str) -> dict:
  """The MHA parameters computing what GQA `params` compute: each K/V head copied to the
  query heads of its group, stacked with Q into one qkv tensor."""
  group = HEADS // KV_HEADS

  def backbone(p):
    blocks = {}
    for name, b in p['blocks'].items():
      b = dict(b)
      q, kv = b.pop('q'), b.pop('kv')
      kv = jnp.repeat(kv, group, axis=2)  # (D, 2, H, Dh): head h uses K/V head h // group
      b['qkv'] = jnp.concatenate([q[:, None], kv], axis=1)
      blocks[name] = b
    return dict(p, blocks=blocks)

  return dict(params, backbone=backbone(params['backbone'])) if kind == 'pflm' else backbone(
      params)


@pytest.fixture(scope='module')
def pair():
  gqa = models.teacher(config(KV_HEADS))
  mha = models.teacher(config(0))
  params = params_lib.random_params(gqa, seed=3)
  return gqa, params, mha, as_multi_head(params, 'ar')


def test_parameters_and_cache_are_smaller():
  gqa, mha = models.teacher(config(KV_HEADS)), models.teacher(config(0))
  d = gqa.cfg.d_model
  # per layer: qkv 3 D^2 -> q D^2 + kv 2 D Hkv Dh
  assert mha.num_params() - gqa.num_params() == gqa.cfg.num_layers * d * (
      2 * d - 2 * KV_HEADS * gqa.cfg.head_dim)
  assert decode.init_cache(gqa.cfg, 3, 10)[0][0].shape == (3, KV_HEADS, 10, gqa.cfg.head_dim)
  assert ragged.init_cache(gqa.cfg, 3, 10)[0][0].shape == (3, KV_HEADS, 10, gqa.cfg.head_dim)
  # the architecture comes back from the stored shapes
  # as an export stores them: string keys, shape tuples
  stored = jax.tree.map(lambda x: tuple(x.shape), gqa.param_shapes)
  stored['blocks'] = {str(i): b for i, b in stored['blocks'].items()}
  again = models.from_shapes(stored, vocab_size=64, mask_id=0)
  assert again.cfg.num_kv_heads == KV_HEADS and again.cfg.num_heads == HEADS


def test_full_forward_equals_multi_head_with_repeated_kv(pair):
  gqa, params, mha, mha_params = pair
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 64, (3, 12)), jnp.int32)
  got, kvs = jax.jit(lambda p, t: gqa.module(p)(t))(params, tokens)
  want, _ = jax.jit(lambda p, t: mha.module(p)(t))(mha_params, tokens)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
  assert np.std(np.asarray(got)) > 0.3
  assert kvs[0][0].shape[1] == KV_HEADS  # context K/V are Hkv heads wide


def test_cached_decode_equals_full_forward_and_multi_head(pair):
  gqa, params, mha, mha_params = pair
  prompts = jnp.asarray(np.random.default_rng(1).integers(1, 64, (2, PREFIX)), jnp.int32)
  key = jax.random.key(4)
  out, rows = decode.generate_ar(gqa, params, prompts, key, 1.0, gen_len=GEN,
                                 return_logits=True)
  full, _ = jax.jit(lambda p, t: gqa.module(p)(t))(params, out)
  np.testing.assert_allclose(np.asarray(rows)[:, PREFIX:], np.asarray(full)[:, PREFIX - 1:-1],
                             atol=2e-5, rtol=0)
  np.testing.assert_array_equal(out, decode.generate_ar(mha, mha_params, prompts, key, 1.0,
                                                        gen_len=GEN))


def test_student_window_stream_and_lossless_loop_equal_multi_head(pair):
  gqa_t, t_params, mha_t, mha_t_params = pair
  gqa_s, mha_s = models.student(config(KV_HEADS), 2), models.student(config(0), 2)
  s_params = params_lib.random_params(gqa_s, seed=5)
  mha_s_params = as_multi_head(s_params, 'pflm')
  prompts = jnp.asarray(np.random.default_rng(2).integers(1, 64, (2, PREFIX)), jnp.int32)
  key = jax.random.key(6)
  lossy = decode.generate_pflm(gqa_s, s_params, prompts, key, 1.0, gen_len=GEN, k=2)
  np.testing.assert_array_equal(
      lossy, decode.generate_pflm(mha_s, mha_s_params, prompts, key, 1.0, gen_len=GEN, k=2))
  lens = np.array([PREFIX, PREFIX - 1], np.int32)
  out = lossless.generate_lossless(gqa_t, t_params, gqa_s, s_params, prompts, lens, key, 1.0,
                                   gen_len=GEN, k=2)
  np.testing.assert_array_equal(
      out['tokens'], lossless.generate_ragged_ar(gqa_t, t_params, prompts, lens, key,
                                                 gen_len=GEN))


def test_kv_heads_must_divide_the_heads():
  with pytest.raises(ValueError, match='num_kv_heads=3 must divide'):
    models.teacher(config(3))
