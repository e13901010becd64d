"""Stage targets, the self-forcing double forward, student init, and a short real stage."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kforcing_jax import decode, distill, sampling, teacher
from kforcing_jax.models import BackboneConfig, FunctionalModel
from kforcing_jax.models.pflm import init_from

CFG = BackboneConfig(vocab_size=64, num_real_tokens=64, mask_id=0, d_model=32, num_layers=2,
                     num_heads=4)


def random_ar():
  ar = FunctionalModel(CFG, 'ar')
  params = ar.init(jax.random.key(0))
  params['head'] = jax.random.normal(jax.random.key(5), params['head'].shape)
  return ar, params


def random_student(k, ar_params, seed=1):
  student = FunctionalModel(CFG, 'pflm', k_max=k)
  params = student.init(jax.random.key(seed))
  params['backbone'] = ar_params
  return student, params


def test_k1_target_is_the_ar_decoders_token():
  ar, params = random_ar()
  prompts = jax.random.randint(jax.random.key(1), (3, 4), 1, 64)
  key = jax.random.key(7)
  gen_len = 16
  tokens = decode.generate_ar(ar, params, prompts, key, 1.0, gen_len=gen_len)
  # window t predicts position t+1 with u = position_uniforms(key, t+1)
  u = decode.position_uniforms(key, jnp.arange(1, gen_len + 1), 3)[..., None]
  targets = distill.ar_targets(ar, params, tokens, u, jnp.ones((3,)))
  np.testing.assert_array_equal(targets[:, 3:gen_len - 1, 0], tokens[:, 4:])


@pytest.mark.parametrize('m', [1, 2])
def test_double_forward_equals_cached_two_step_decoding(m):
  ar, ar_params = random_ar()
  teacher, params = random_student(m, ar_params)
  batch, n = 2, 9
  tokens = jax.random.randint(jax.random.key(3), (batch, n), 1, 64)
  key = jax.random.key(11)
  # slot i of window t uses the decoder's noise for position t + i
  u_pos = decode.position_uniforms(key, jnp.arange(n + 2 * m + 1), batch)
  u = jnp.stack([u_pos[:, i:i + n] for i in range(1, 2 * m + 1)], axis=-1)
  targets = distill.rollout_targets(teacher, params, tokens, u, jnp.ones((batch,)))
  for t in range(m - 1, n):
    decoded = decode.generate_pflm(teacher, params, tokens[:, :t + 1], key, 1.0,
                                   gen_len=t + 1 + 2 * m, k=m)
    np.testing.assert_array_equal(targets[:, t], decoded[:, t + 1:], err_msg=f'window {t}')


def test_greedy_rollout_matches_sequential_argmax():
  ar, params = random_ar()
  tokens = jax.random.randint(jax.random.key(4), (2, 8), 1, 64)
  greedy = distill.greedy_rollout(ar, params, tokens, 3)
  for t in (0, 4):
    seq = tokens[:, :t + 1]
    for _ in range(3):
      logits, _ = ar.module(params)(seq)
      seq = jnp.concatenate([seq, jnp.argmax(logits[:, -1], -1)[:, None]], axis=1)
    np.testing.assert_array_equal(greedy[:, t], seq[:, t + 1:])


def test_noise_inversion_reproduces_real_tokens():
  ar, params = random_ar()
  params['head'] = params['head'] * 0.05  # soft enough that every token has a usable interval
  tokens = jax.random.randint(jax.random.key(6), (2, 10), 1, 64)
  r = jax.random.uniform(jax.random.key(8), (2, 10, 2))
  u, real, valid = distill.inverted_noise(ar, params, tokens, 2, r, jnp.ones((2,)))
  logits, _ = ar.module(params)(tokens)
  for i in range(2):  # slot i of window t predicts x_{t+1+i} from position t+i
    sampled = sampling.inverse_cdf_sample(logits[:, i:], u[:, :10 - i, i])
    np.testing.assert_array_equal(sampled[:, :9 - i], tokens[:, 1 + i:])
  assert bool(valid[:, :8].all()) and not bool(valid[:, 9, 0].any()) and not bool(valid[:, 8, 1].any())
  np.testing.assert_array_equal(real[:, :8, 1], tokens[:, 2:])


def test_noise_inversion_leaves_out_unrepresentable_tokens():
  ar, params = random_ar()
  params['head'] = params['head'] * 0.0
  params['head_bias'] = jnp.zeros((64,)).at[5].set(200.0)  # p(other tokens) underflows to 0
  tokens = jnp.full((1, 6), 7, jnp.int32)
  _, _, valid = distill.inverted_noise(ar, params, tokens, 1, jnp.full((1, 6, 1), 0.5),
                                       jnp.ones((1,)))
  assert not bool(valid.any())


def test_slot_metrics_on_constructed_logits():
  targets = jnp.array([[[1, 2], [3, 0]]])                      # (1, 2 windows, k=2)
  logits = jax.nn.one_hot(jnp.array([[[1, 2], [3, 1]]]), 4) * 10.0
  _, acc_i, acc_total, count = distill.slot_metrics(logits, targets, jnp.ones((1, 2)))
  np.testing.assert_allclose(acc_i, [1.0, 0.5])
  assert float(acc_total) == 0.5 and float(count) == 2.0
  mask = distill.window_mask(jnp.ones((1, 6)), 2)
  np.testing.assert_array_equal(mask[0], [True, True, True, True, False, False])


def test_student_init_copies_teacher_exactly_and_names_mismatches():
  ar, ar_params = random_ar()
  student = FunctionalModel(CFG, 'pflm', k_max=1)
  fresh = student.init(jax.random.key(2))
  params, created = init_from(ar_params, fresh, 'ar')
  for a, b in zip(jax.tree.leaves(ar_params), jax.tree.leaves(params['backbone'])):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(fresh['noise_encoder']),
                  jax.tree.leaves(params['noise_encoder'])):
    np.testing.assert_array_equal(a, b)
  assert len(jax.tree.leaves(params)) - len(created) == 20 and len(created) == 8  # copied, new
  wide = FunctionalModel(BackboneConfig(vocab_size=64, num_real_tokens=64, mask_id=0, d_model=48,
                                        num_layers=2, num_heads=4), 'ar')
  with pytest.raises(ValueError, match=r"\['backbone'\]\['blocks'\]\[0\]\['attn_out'\] has shape"):
    init_from(wide.init(jax.random.key(0)), fresh, 'ar')


def test_schedule_validation():
  assert distill.validate_schedule(((1, 5), (2, 5))) == [(1, 5), (2, 5)]
  with pytest.raises(ValueError, match='first stage must be k=1'):
    distill.validate_schedule(((2, 5),))
  with pytest.raises(ValueError, match='double'):
    distill.validate_schedule(((1, 5), (4, 5)))


def test_stage_needs_its_teacher(tiny_data_config, tmp_path):
  with pytest.raises(FileNotFoundError, match='needs its teacher'):
    distill.run(tiny_data_config, str(tmp_path), only_stage=1)


def test_data_term_refuses_gradient_accumulation(tiny_data_config, tmp_path):
  tiny_data_config.distill.data_weight = 0.5
  tiny_data_config.distill.microbatches = 2
  with pytest.raises(ValueError, match='not supported'):
    distill.run(tiny_data_config, str(tmp_path), only_stage=1)


@pytest.mark.slow
def test_short_stage_learns_to_use_the_noise(tiny_data_config, tmp_path):
  """A few hundred k=1 steps beat the ignore-the-noise baseline E[max p] on held-out text."""
  config = tiny_data_config
  config.train.steps = 60
  teacher.run(config, str(tmp_path))
  config.distill.stages = ((1, 300),)
  config.distill.eval_every = 300
  config.distill.eval_batches = 4
  results = distill.run(config, str(tmp_path))
  with open(tmp_path / 'student_k1' / 'eval.json') as f:
    saved = json.load(f)
  assert saved['k'] == 1 and saved['steps'] == 300 and len(saved['acc']) == 1
  assert saved['acc_total'] == pytest.approx(results[1]['acc_total'])
  assert saved['acc'][0] > saved['baseline_acc_total'] + 0.05, saved
