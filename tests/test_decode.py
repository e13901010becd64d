"""The jitted decode loops against independent computations.

* k-token decoding (KV cache, one window per step) emits exactly the argmax of the student's
  all-windows training forward on the final sequence, with the same noises at the same windows;
  with k < k_max it equals the training forward restricted to the first k slots.
* the frequency penalty: slot-by-slot count updates, prompt tokens not counted.
* the AR decoder's token at position j is the inverse-CDF sample for u = position_uniforms(key, j),
  i.e. a perfect k=1 student (the distillation target) reproduces it token for token.
* cached AR decoding reproduces the logits of one full forward; EOS handling.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test_tiny
from kforcing_jax import decode, distill, models, sampling
from kforcing_jax.models import FunctionalModel
from kforcing_jax.models.pflm import sinusoidal_features
from tests.helpers import params as params_lib

BATCH = 3
PREFIX_LEN = 4
GEN_LEN = 13        # 9 new tokens: the last k-token step (k = 2, 4) runs past the end
HEAD_SCALE = 0.1    # logits of std ~1 over 256 tokens: diverse samples, no near-ties to speak of
LOGIT_ATOL = 1e-4   # float32 cached decode vs one full forward


def tiny_config():
  return test_tiny.get_config()


def random_params(model: FunctionalModel, seed: int) -> dict:
  """Random weights with a HEAD_SCALE output head, so tokens depend on the context and the
  noise, and a wrong window or slot would give different tokens."""
  return params_lib.random_params(model, seed, head_scale=HEAD_SCALE)


@pytest.fixture(scope='module')
def teacher():
  model = models.teacher(tiny_config())
  return model, random_params(model, 0)


def with_noise_sensitive_hints(params: dict) -> dict:
  """At init most sinusoidal features of u are ~constant (low frequencies), so the hints barely
  depend on u and argmax decoding would repeat one token. Centering the projection over u
  (bias = -E_u[features] @ proj) leaves only the u-dependent part: tokens then follow u."""
  enc = params['noise_encoder']
  d = enc['proj_bias'].shape[0]
  u = jnp.linspace(0.0, 1.0, 1001)
  feats = jnp.concatenate([sinusoidal_features(u, d),
                           sinusoidal_features(jnp.ones_like(u), d)], axis=-1)
  enc['proj'] = 3.0 * enc['proj']
  enc['proj_bias'] = -feats.mean(0) @ enc['proj']
  return params


@pytest.fixture(scope='module')
def student_params():
  """Random k_max=4 student params (any k_max <= 4 shares the same parameter tree)."""
  model = models.student(tiny_config(), 4)
  return with_noise_sensitive_hints(random_params(model, 2))


def random_prompts(seed: int = 4, batch: int = BATCH, length: int = PREFIX_LEN):
  return jax.random.randint(jax.random.key(seed), (batch, length), 1, 256, dtype=jnp.int32)


def window_uniforms(key, batch: int, length: int, k: int):
  """u (B, N, k) of the training forward: slot (t, i-1) predicts position t+i, so it gets the
  decoder's noise for that output position, position_uniforms(key, t + i)."""
  positions = (jnp.arange(length)[:, None] + jnp.arange(1, k + 1)[None, :]).reshape(-1)
  return decode.position_uniforms(key, positions, batch).reshape(batch, length, k)


@functools.partial(jax.jit, static_argnames=('model',))
def training_forward_argmax(model, params, tokens, u):
  logits, _ = model.module(params)(tokens, u, jnp.ones((tokens.shape[0],)))
  return jnp.argmax(logits, axis=-1)


# ----------------------------------------------------------------------------- k-token decoding

@pytest.mark.parametrize('k_max, k', [(1, 1), (2, 2), (4, 4), (4, 2)])
def test_pflm_decode_equals_all_windows_training_forward(student_params, k_max, k):
  model = models.student(tiny_config(), k_max)
  key = jax.random.key(11)
  prompts = random_prompts()
  out = np.asarray(decode.generate_pflm(model, student_params, prompts, key, 1.0,
                                        gen_len=GEN_LEN, k=k))
  np.testing.assert_array_equal(out[:, :PREFIX_LEN], prompts)

  # the training forward over the final sequence, u truncated to the k slots decoding uses
  u = window_uniforms(key, BATCH, GEN_LEN, k)
  predicted = np.asarray(training_forward_argmax(model, student_params, jnp.asarray(out), u))
  checked = 0
  for t in range(PREFIX_LEN - 1, GEN_LEN - 1, k):  # the window each decode step ends at
    emitted = out[:, t + 1:min(t + 1 + k, GEN_LEN)]
    np.testing.assert_array_equal(emitted, predicted[:, t, :emitted.shape[1]],
                                  err_msg=f'k_max={k_max} k={k} window t={t}')
    checked += emitted.size
  assert checked == BATCH * (GEN_LEN - PREFIX_LEN)

  # not vacuous: varied tokens, and a different noise key gives different tokens
  assert len(np.unique(out[:, PREFIX_LEN:])) >= 8
  other = decode.generate_pflm(model, student_params, prompts, jax.random.key(12), 1.0,
                               gen_len=GEN_LEN, k=k)
  assert np.mean(np.asarray(other)[:, PREFIX_LEN:] != out[:, PREFIX_LEN:]) > 0.5


def test_pflm_k_larger_than_k_max_is_a_clear_error(student_params):
  model = models.student(tiny_config(), 2)
  with pytest.raises(ValueError, match=r'k=4 is larger than this student supports \(k_max=2\)'):
    decode.generate_pflm(model, student_params, random_prompts(), jax.random.key(0), 1.0,
                         gen_len=GEN_LEN, k=4)


# ----------------------------------------------------------------------------- frequency penalty

def test_penalized_argmax_slot_by_slot():
  logits = jnp.array([[[0.0, 2.0, 1.9, 0.0]] * 3])            # (B=1, k=3, V=4), same each slot
  tokens, counts = decode.penalized_readout(logits, jnp.zeros((1, 4)), 0.5,
                                           jnp.ones((1, 3), bool))
  # slot 0: 2.0 > 1.9 -> 1; slot 1: 1.5 < 1.9 -> 2; slot 2: 1.5 > 1.4 -> 1
  np.testing.assert_array_equal(tokens, [[1, 2, 1]])
  np.testing.assert_array_equal(counts, [[0, 2, 1, 0]])
  # an inactive slot (past the requested length) emits but is not counted
  tokens, counts = decode.penalized_readout(logits, jnp.zeros((1, 4)), 0.5,
                                           jnp.array([[True, False, True]]))
  np.testing.assert_array_equal(tokens, [[1, 2, 2]])
  np.testing.assert_array_equal(counts, [[0, 1, 1, 0]])
  # counts carried in from earlier steps
  tokens, _ = decode.penalized_readout(logits[:, :1], jnp.array([[0.0, 1.0, 0.0, 0.0]]), 0.5,
                                      jnp.ones((1, 1), bool))
  np.testing.assert_array_equal(tokens, [[2]])


@pytest.mark.parametrize('k', [1, 2, 4])
def test_frequency_penalty_in_the_decode_loop(student_params, k):
  """Zero head + a constructed bias: every slot's logits are the bias, whatever the context,
  so with lambda = 0.5 the tokens follow from the counts alone (computed by hand):
      scores of tokens 1, 2, 3 (bias 3.0, 2.8, 2.45)      pick   counts (1, 2, 3)
      3.0 2.8 2.45 -> 1 | 2.5 2.8 2.45 -> 2 | 2.5 2.3 2.45 -> 1 | 2.0 2.3 2.45 -> 3
      2.0 2.3 1.95 -> 2 | 2.0 1.8 1.95 -> 1 | 1.5 1.8 1.95 -> 3 | 1.5 1.8 1.45 -> 2
  The prompt is all token 1: were it counted, the first pick would be 2."""
  model = models.student(tiny_config(), 4)
  params = jax.tree.map(lambda x: x, student_params)
  params['backbone']['head'] = jnp.zeros_like(params['backbone']['head'])
  params['backbone']['head_bias'] = jnp.full((256,), -5.0).at[1:5].set([3.0, 2.8, 2.45, 1.0])
  prompts = jnp.ones((1, PREFIX_LEN), jnp.int32)
  out = decode.generate_pflm(model, params, prompts, jax.random.key(0), 1.0,
                             gen_len=PREFIX_LEN + 8, k=k, freq_penalty=0.5)
  np.testing.assert_array_equal(np.asarray(out)[0, PREFIX_LEN:], [1, 2, 1, 3, 2, 1, 3, 2])


# ----------------------------------------------------------------------------- AR decoding

def test_ar_decoder_equals_a_perfect_k1_student(teacher):
  """The k=1 distillation target (inverse CDF of the full-forward teacher at window t with
  u = position_uniforms(key, t + 1)) is the AR decoder's token at t + 1."""
  model, params = teacher
  key = jax.random.key(21)
  out = decode.generate_ar(model, params, random_prompts(), key, 1.0, gen_len=GEN_LEN)
  u = window_uniforms(key, BATCH, GEN_LEN, 1)
  targets = jax.jit(distill.ar_targets, static_argnums=0)(model, params, out, u,
                                                           jnp.ones((BATCH,)))
  np.testing.assert_array_equal(np.asarray(targets)[:, PREFIX_LEN - 1:-1, 0],
                                np.asarray(out)[:, PREFIX_LEN:])
  assert len(np.unique(np.asarray(out)[:, PREFIX_LEN:])) > 10


def test_ar_cached_logits_equal_one_full_forward(teacher):
  model, params = teacher
  out, rows = decode.generate_ar(model, params, random_prompts(), jax.random.key(5), 1.0,
                                 gen_len=GEN_LEN, return_logits=True)
  full, _ = jax.jit(lambda p, t: model.module(p)(t))(params, out)
  # row j holds the logits that produced token j, i.e. the full forward's prediction at j-1
  np.testing.assert_allclose(np.asarray(rows)[:, PREFIX_LEN:],
                             np.asarray(full)[:, PREFIX_LEN - 1:-1], atol=LOGIT_ATOL, rtol=0)
  assert not np.any(np.asarray(rows)[:, :PREFIX_LEN])
  assert np.std(np.asarray(full)[:, :, 1:]) > 0.3  # real, varied logits


def expected_after_eos(tokens, eos_id, mask_id):
  """Reference rule: after the first EOS at a generated position, everything is mask_id."""
  tokens = np.array(tokens)
  for row in tokens:
    hits = np.flatnonzero(row[PREFIX_LEN:] == eos_id)
    if hits.size:
      row[PREFIX_LEN + hits[0] + 1:] = mask_id
  return tokens


@pytest.mark.parametrize('kind', ['ar', 'pflm_k2'])
def test_eos_pads_after_the_first_generated_eos(teacher, student_params, kind):
  eos, mask_id, gen_len = 7, tiny_config().model.mask_id, 24
  prompts = random_prompts(batch=4).at[:, 1].set(eos)  # an EOS inside every prompt: ignored
  if kind == 'ar':
    model, params = teacher
    params = jax.tree.map(lambda x: x, params)
    params['head_bias'] = params['head_bias'].at[eos].set(4.0)  # EOS ~13% per step
  else:
    model = models.student(tiny_config(), 2)
    params = jax.tree.map(lambda x: x, student_params)
    params['backbone']['head_bias'] = params['backbone']['head_bias'].at[eos].set(1.5)

  def run(eos_id):
    if kind == 'ar':
      return decode.generate_ar(model, params, prompts, jax.random.key(8), 1.0,
                                gen_len=gen_len, eos_id=eos_id)
    return decode.generate_pflm(model, params, prompts, jax.random.key(8), 1.0,
                                gen_len=gen_len, k=2, eos_id=eos_id)

  free = np.asarray(run(None))
  stopped = np.asarray(run(eos))
  np.testing.assert_array_equal(stopped, expected_after_eos(free, eos, mask_id))
  assert np.all(stopped[:, 1] == eos)
  padded_rows = np.sum(np.any(stopped[:, PREFIX_LEN:] == mask_id, axis=1))
  assert padded_rows >= 2, 'not enough rows hit EOS early: the test would be vacuous'


def test_first_argmax_equals_jnp_argmax_with_ties_and_nans():
  x = jnp.round(jax.random.normal(jax.random.key(3), (64, 300)), 1)  # many exact ties
  x = x.at[5, 17].set(jnp.nan).at[5, 200].set(jnp.nan).at[9].set(-jnp.inf)
  np.testing.assert_array_equal(sampling.first_argmax(x), jnp.argmax(x, axis=-1))


def test_penalized_argmax_equals_the_one_hot_reference():
  """The scatter-add count update and the two-reduction argmax give the same tokens and counts
  as the plain formula: argmax(logits_j - lambda * counts), counts += one_hot * active."""
  logits = jnp.round(jax.random.normal(jax.random.key(4), (16, 4, 50)), 1)
  counts = jnp.floor(3 * jax.random.uniform(jax.random.key(5), (16, 50)))
  active = jax.random.bernoulli(jax.random.key(6), 0.8, (16, 4))
  for penalty in (0.0, 0.5):
    ref_counts, ref_tokens = counts, []
    for j in range(4):
      token = jnp.argmax(logits[:, j] - penalty * ref_counts, axis=-1)
      ref_counts = ref_counts + jax.nn.one_hot(token, 50) * active[:, j, None]
      ref_tokens.append(token)
    tokens, new_counts = decode.penalized_readout(logits, counts, penalty, active)
    np.testing.assert_array_equal(tokens, jnp.stack(ref_tokens, axis=1))
    np.testing.assert_array_equal(new_counts, ref_counts)
