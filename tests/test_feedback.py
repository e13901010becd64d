"""Token feedback (model.token_feedback): a student whose later slots read the earlier slots'
tokens through one more block (models/pflm.py, PushForwardLM.slot_readout).

Each check compares two computations that must agree:
* a fresh feedback block is the identity: the student's logits equal those of the same student
  without one (to float32 rounding);
* the slot-by-slot readout (k - 1 block passes over growing prefixes of the window) equals one
  teacher-forced pass fed the tokens it picked, and feeding other tokens changes slots 2..k only;
* k-token decoding with its KV cache, the self-forcing double forward, and the lossless draft
  pass each equal the all-windows forward on the final sequence, token for token.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test_tiny
from kforcing_jax import decode, distill, lossless, models, roofline, sampling
from kforcing_jax.models.pflm import init_from
from tests.helpers import params as params_lib
from tests.test_distill import check_double_forward
from tests.test_decode import (BATCH, GEN_LEN, PREFIX_LEN, random_prompts,
                               with_noise_sensitive_hints, window_uniforms)

HEAD_SCALE = 0.1


def tiny_config(feedback=True, order='id', readout='argmax'):
  c = test_tiny.get_config()
  c.model.token_feedback = feedback
  c.model.cdf_order = order
  c.model.readout = readout
  return c


def feedback_student(k_max=4, seed=2, **kw):
  """A random student whose feedback block is random too (a fresh one is the identity)."""
  model = models.student(tiny_config(**kw), k_max)
  params = with_noise_sensitive_hints(params_lib.random_params(model, seed, head_scale=HEAD_SCALE))
  if 'feedback_in' in params:  # k_max > 1
    rng = np.random.default_rng(seed + 100)
    params['feedback_in'] = jnp.asarray(0.5 * rng.standard_normal(params['feedback_in'].shape),
                                        jnp.float32)
  return model, params


def own_tokens(model, params, tokens, u):
  logits, _ = model.module(params)(tokens, u, jnp.ones((tokens.shape[0],)))
  return logits, sampling.student_tokens(model.cfg, logits, u)


def test_a_fresh_feedback_block_is_the_identity():
  plain = models.student(tiny_config(feedback=False), 4)
  fed = models.student(tiny_config(feedback=True), 4)
  params = fed.init(jax.random.key(0))
  params['backbone']['head'] = jax.random.normal(jax.random.key(1),
                                                 params['backbone']['head'].shape)
  assert set(params) - set(plain.param_shapes) == {'feedback', 'feedback_in'}
  tokens = jax.random.randint(jax.random.key(2), (2, 12), 1, 256)
  u = jax.random.uniform(jax.random.key(3), (2, 12, 4))
  a, _ = plain.module({k: params[k] for k in plain.param_shapes})(tokens, u, jnp.ones((2,)))
  b, _ = fed.module(params)(tokens, u, jnp.ones((2,)))
  # equal up to float32 rounding (the head runs per slot with feedback, once without)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


@pytest.mark.parametrize('order, readout', [('id', 'argmax'), ('gumbel', 'inverse_cdf')])
def test_slot_by_slot_readout_equals_one_teacher_forced_pass(order, readout):
  model, params = feedback_student(order=order, readout=readout)
  tokens = jax.random.randint(jax.random.key(4), (3, 14), 1, 256)
  u = jax.random.uniform(jax.random.key(5), (3, 14, 4))
  tau = jnp.ones((3,))
  logits, picked = own_tokens(model, params, tokens, u)
  forced, _ = model.module(params)(tokens, u, tau, fed=picked)
  np.testing.assert_allclose(np.asarray(forced), np.asarray(logits), atol=2e-5)
  # other tokens fed: slot 1 is unchanged, every later slot moves (the tokens are read)
  other, _ = model.module(params)(tokens, u, tau, fed=(picked + 7) % 256)
  np.testing.assert_array_equal(np.asarray(other[:, :, 0]), np.asarray(logits[:, :, 0]))
  moved = np.abs(np.asarray(other[:, :, 1:] - logits[:, :, 1:])).max(-1)
  assert (moved > 1e-3).all()
  # the student without its feedback block reads out differently
  plain = models.student(tiny_config(feedback=False, order=order, readout=readout), 4)
  p, _ = plain.module({k: params[k] for k in plain.param_shapes})(tokens, u, tau)
  assert np.abs(np.asarray(p[:, :, 1:] - logits[:, :, 1:])).max() > 1e-2


@pytest.mark.parametrize('k, order, readout', [(2, 'id', 'argmax'), (4, 'id', 'argmax'),
                                               (4, 'gumbel', 'inverse_cdf')])
def test_decode_equals_the_all_windows_forward(k, order, readout):
  model, params = feedback_student(order=order, readout=readout)
  key = jax.random.key(11)
  prompts = random_prompts()
  out = np.asarray(decode.generate_pflm(model, params, prompts, key, 1.0, gen_len=GEN_LEN, k=k))
  u = window_uniforms(key, BATCH, GEN_LEN, k)
  # the first k slots of a k_max = 4 student: the training forward restricted to them
  _, predicted = own_tokens(model, params, jnp.asarray(out), u)
  predicted = np.asarray(predicted)
  for t in range(PREFIX_LEN - 1, GEN_LEN - 1, k):
    emitted = out[:, t + 1:min(t + 1 + k, GEN_LEN)]
    np.testing.assert_array_equal(emitted, predicted[:, t, :emitted.shape[1]], err_msg=f't={t}')
  assert len(np.unique(out[:, PREFIX_LEN:])) >= 8


def test_double_forward_equals_cached_two_step_decoding():
  teacher, params = feedback_student(k_max=2, seed=3)
  check_double_forward(teacher, params, 2)


def test_lossless_drafts_equal_the_all_windows_forward_and_output_is_ar():
  teacher = models.teacher(tiny_config())
  t_params = params_lib.random_params(teacher, 0, head_scale=HEAD_SCALE)
  student, s_params = feedback_student(seed=5)
  batch, gen_len, k = 4, 40, 3
  prompts = np.random.default_rng(0).integers(2, 256, (batch, 6)).astype(np.int32)
  lens = np.array([6, 5, 6, 5], np.int32)
  key = jax.random.key(21)
  out = lossless.verify_loop(teacher, t_params, student, s_params, prompts, lens, key, 1.0,
                             gen_len=gen_len, k=k, return_drafts=True)
  tokens = np.asarray(out['tokens'])
  for length in np.unique(lens):
    ref = np.asarray(decode.generate_ar(teacher, t_params, jnp.asarray(prompts[:, :length]),
                                        key, 1.0, gen_len=gen_len))
    rows = lens == length
    np.testing.assert_array_equal(tokens[rows, length:], ref[rows, length:])
  positions = (np.arange(gen_len)[:, None] + np.arange(1, k + 1)[None, :]).reshape(-1)
  u = decode.position_uniforms(key, jnp.asarray(positions), batch).reshape(batch, gen_len, k)
  _, predicted = own_tokens(student, s_params, jnp.asarray(tokens), u)
  drafts, starts = np.asarray(out['drafts']), np.asarray(out['draft_starts'])
  checked = 0
  for b in range(batch):
    for j in range(lens[b], gen_len):
      if drafts[b, j] >= 0:
        assert drafts[b, j] == predicted[b, starts[b, j] - 1, j - starts[b, j]], (b, j)
        checked += 1
  assert checked > 50


def test_training_reaches_the_feedback_block():
  """The teacher-forced loss has a gradient on every feedback tensor; a student initialised
  from one without feedback keeps them fresh, and the stored shapes say it has them."""
  config = tiny_config(order='gumbel', readout='inverse_cdf')
  teacher, t_params = feedback_student(k_max=1, seed=6, order='gumbel', readout='inverse_cdf')
  assert set(t_params) == set(models.student(tiny_config(feedback=False), 1).param_shapes)
  student = models.student(config, 2)
  params, created = init_from(t_params, student.init(jax.random.key(0)), 'pflm')
  assert created and all('feedback' in name for name in created)
  params['feedback_in'] = feedback_student(k_max=2, seed=6)[1]['feedback_in']  # not zero
  tokens = jax.random.randint(jax.random.key(7), (2, 16), 1, 256)
  batch = dict(tokens=tokens, u=jax.random.uniform(jax.random.key(8), (2, 16, 2)),
               tau=jnp.ones((2,)), mask=jnp.ones((2, 16)))
  grads = jax.grad(lambda p: distill.distribution_loss(student, teacher, p, batch,
                                                       t_params)[0])(params)
  # the zero-initialised outputs and the token projection move first (the block's inner
  # matrices get a gradient once its outputs are non-zero); the backbone is trained too
  assert float(jnp.abs(grads['feedback_in']).max()) > 0
  for name in ('attn_out', 'mlp_out', 'mlp_out_bias'):
    assert float(jnp.abs(grads['feedback'][name]).max()) > 0, name
  assert float(jnp.abs(grads['backbone']['head']).max()) > 0
  stored = models.flat_shapes(params)
  assert any(name.startswith('feedback') for name in stored)
  # as stored on disk: string keys, shapes as lists
  def stored(tree):
    return ({str(k): stored(v) for k, v in tree.items()} if isinstance(tree, dict)
            else tuple(tree.shape))
  shapes = stored(params)
  again = models.from_shapes(shapes, vocab_size=256,
                             mask_id=config.model.mask_id, k_max=2,
                             cdf_order='gumbel', readout='inverse_cdf')
  assert again.cfg.token_feedback and set(again.param_shapes) == set(params)
  # the k = 1 teacher's tree has no block: read back as a student without feedback
  plain = models.from_shapes(stored(t_params), vocab_size=256, mask_id=config.model.mask_id,
                             cdf_order='gumbel', readout='inverse_cdf')
  assert not plain.cfg.token_feedback


def test_feedback_flops_in_the_analytic_step_cost_match_xla():
  """What token feedback adds to a k = 4 decode step, counted by hand (roofline) and by XLA's
  cost analysis of the compiled step: the two differences agree."""
  plain, fed = (models.student(tiny_config(feedback=f), 4) for f in (False, True))
  xla = [roofline.xla_step_cost(m, 4, 8, 16)['flops'] for m in (plain, fed)]
  analytic = [roofline.analytic_step_cost(m, 4, 8, 16)['flops'] for m in (plain, fed)]
  added = analytic[1] - analytic[0]
  assert added > 0.1 * analytic[0]  # not a negligible term at this size
  # leaving out any one term (the fed projection, the attention, row 0's projections: 4-7% of
  # the added FLOPs each) breaks this
  assert added == pytest.approx(xla[1] - xla[0], rel=0.03)


@pytest.mark.parametrize('k', [2, 4])
def test_a_fresh_block_decodes_like_no_feedback_with_the_penalty(k):
  """The penalised picks flow through pflm_step's slot-by-slot readout: with the identity
  (fresh) block the tokens equal those of the same student without feedback, penalty on."""
  fed_model, params = feedback_student()
  params['feedback_in'] = jnp.zeros_like(params['feedback_in'])
  for name in ('attn_out', 'mlp_out', 'mlp_out_bias'):
    params['feedback'][name] = jnp.zeros_like(params['feedback'][name])
  plain = models.student(tiny_config(feedback=False), 4)
  plain_params = {name: params[name] for name in plain.param_shapes}
  prompts, key = random_prompts(), jax.random.key(13)
  out = [np.asarray(decode.generate_pflm(m, p, prompts, key, 1.0, gen_len=GEN_LEN, k=k,
                                         freq_penalty=2.0))
         for m, p in ((fed_model, params), (plain, plain_params))]
  np.testing.assert_array_equal(out[0], out[1])
  # the penalty acts (not vacuous): without it the tokens differ
  free = np.asarray(decode.generate_pflm(fed_model, params, prompts, key, 1.0, gen_len=GEN_LEN,
                                         k=k))
  assert (free != out[0]).any()
