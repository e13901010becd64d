"""The student readout (model.readout): argmax (the paper's) and inverse_cdf (each slot's
distribution sampled with the slot's own noise), the same rule in decoding, the self-forcing
rollout, the stage loss and the recorded model settings."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test_tiny
from kforcing_jax import checkpoints, decode, distill, models, provenance, rundir, sampling
from kforcing_jax import sharding, teacher
from kforcing_jax.models import BackboneConfig, FunctionalModel
from tests.helpers import params as params_lib

CFG = BackboneConfig(vocab_size=64, num_real_tokens=64, mask_id=0, d_model=32, num_layers=2,
                     num_heads=4, readout='inverse_cdf')


def random_ar():
  ar = FunctionalModel(CFG, 'ar')
  params = ar.init(jax.random.key(0))
  params['head'] = jax.random.normal(jax.random.key(5), params['head'].shape)
  return ar, params


def random_student(k, seed=1):
  """A student with a random head: slot distributions that differ per context and window."""
  student = FunctionalModel(CFG, 'pflm', k_max=k)
  params = student.init(jax.random.key(seed))
  params['backbone'] = random_ar()[1]
  params['noise_encoder']['proj'] = 3.0 * params['noise_encoder']['proj']
  return student, params


def noises(key, batch, n, k):
  """u (B, N, k): slot i of window t gets the decoder's noise for position t + i."""
  u_pos = decode.position_uniforms(key, jnp.arange(n + k + 1), batch)
  return jnp.stack([u_pos[:, i:i + n] for i in range(1, k + 1)], axis=-1)


@pytest.mark.parametrize('order', ['id', 'sorted'])
def test_readout_tokens_are_argmax_or_the_inverse_cdf_sample(order):
  logits = 2.0 * jax.random.normal(jax.random.key(0), (5, 7, 64))
  logits = logits.at[0, 0, :3].set(9.0)  # a tie: the first maximal id
  u = jax.random.uniform(jax.random.key(1), (5, 7))
  np.testing.assert_array_equal(sampling.readout_tokens(logits, u, 'argmax', order),
                                jnp.argmax(logits, -1))
  sampled = sampling.readout_tokens(logits, u, 'inverse_cdf', order)
  np.testing.assert_array_equal(sampled, sampling.inverse_cdf_sample(logits, u, 1.0, order))
  # it reads u: other noises give other tokens, the argmax readout does not move
  other = sampling.readout_tokens(logits, 1.0 - u, 'inverse_cdf', order)
  assert np.mean(np.asarray(other) != np.asarray(sampled)) > 0.5
  with pytest.raises(ValueError, match='model.readout'):
    sampling.readout_tokens(logits, u, 'mode', order)


@pytest.mark.parametrize('k_max, k', [(1, 1), (2, 2), (4, 4), (4, 2)])
def test_inverse_cdf_decode_equals_the_all_windows_forward(k_max, k):
  config = test_tiny.get_config()
  config.model.readout = 'inverse_cdf'
  model = models.student(config, k_max)
  params = params_lib.random_params(model, 2, head_scale=0.1)
  batch, prefix, gen_len = 3, 4, 13
  prompts = jax.random.randint(jax.random.key(4), (batch, prefix), 1, 256, dtype=jnp.int32)
  key = jax.random.key(11)
  out = np.asarray(decode.generate_pflm(model, params, prompts, key, 1.0, gen_len=gen_len, k=k))
  u = noises(key, batch, gen_len, k)
  logits, _ = model.module(params)(jnp.asarray(out), u, jnp.ones((batch,)))
  predicted = np.asarray(sampling.student_tokens(model.cfg, logits, u))
  for t in range(prefix - 1, gen_len - 1, k):
    emitted = out[:, t + 1:min(t + 1 + k, gen_len)]
    np.testing.assert_array_equal(emitted, predicted[:, t, :emitted.shape[1]], err_msg=f't={t}')
  # the noise, not only the weights, picks the tokens: with a random head the slots are
  # near-flat distributions, so another key changes most of them
  other = decode.generate_pflm(model, params, prompts, jax.random.key(12), 1.0,
                               gen_len=gen_len, k=k)
  assert np.mean(np.asarray(other)[:, prefix:] != out[:, prefix:]) > 0.5
  argmax_model = models.student(test_tiny.get_config(), k_max)
  greedy = decode.generate_pflm(argmax_model, params, prompts, key, 1.0, gen_len=gen_len, k=k)
  assert np.mean(np.asarray(greedy)[:, prefix:] != out[:, prefix:]) > 0.5


@pytest.mark.parametrize('m', [1, 2])
def test_inverse_cdf_rollout_equals_cached_decoding_and_returns_its_distributions(m):
  student, params = random_student(m)
  batch, n = 2, 9
  tokens = jax.random.randint(jax.random.key(3), (batch, n), 1, 64)
  key = jax.random.key(11)
  u = noises(key, batch, n, 2 * m)
  targets, q = distill.stage_distributions(student, params, tokens, u, jnp.ones((batch,)))
  assert q.shape == (batch, n, 2 * m, 64)
  np.testing.assert_allclose(q.sum(-1), 1.0, atol=1e-5)
  # every target token is the inverse-CDF sample of the distribution returned with it
  np.testing.assert_array_equal(targets, sampling.inverse_cdf_from_probs(q, u, CFG.cdf_order))
  for t in range(m - 1, n):
    decoded = decode.generate_pflm(student, params, tokens[:, :t + 1], key, 1.0,
                                   gen_len=t + 1 + 2 * m, k=m)
    np.testing.assert_array_equal(targets[:, t], decoded[:, t + 1:], err_msg=f'window {t}')


def test_k1_distributions_are_the_ar_teachers_at_temperature_tau():
  ar, params = random_ar()
  tokens = jax.random.randint(jax.random.key(3), (2, 9), 1, 64)
  u = noises(jax.random.key(2), 2, 9, 1)
  tau = jnp.asarray([1.0, 0.5])
  targets, q = distill.stage_distributions(ar, params, tokens, u, tau)
  logits, _ = ar.module(params)(tokens)
  want = jax.nn.softmax(np.asarray(logits, np.float64) / np.asarray(tau)[:, None, None], -1)
  np.testing.assert_allclose(q[:, :, 0], want, atol=1e-6)
  np.testing.assert_array_equal(targets, distill.ar_targets(ar, params, tokens, u, tau))


@pytest.mark.parametrize('prev_k', [None, 1])
def test_distribution_loss_is_the_kl_to_the_teacher_distributions(prev_k):
  """The stage loss against a float64 reference KL from the same logits and distributions,
  and acc_i against the readout tokens counted by hand."""
  k = 1 if prev_k is None else 2
  ar, ar_params = random_ar()
  stage_teacher, teacher_params = (ar, ar_params) if prev_k is None else random_student(prev_k, 7)
  student, params = random_student(k, 3)
  batch, n = 2, 8
  tokens = jax.random.randint(jax.random.key(3), (batch, n), 1, 64)
  u = noises(jax.random.key(5), batch, n, k)
  data = {'tokens': tokens, 'mask': jnp.ones((batch, n)), 'u': u, 'tau': jnp.ones((batch,))}
  loss, metrics = distill.distribution_loss(student, stage_teacher, params, data, teacher_params)

  targets, q = distill.stage_distributions(stage_teacher, teacher_params, tokens, u, data['tau'])
  logits, _ = student.module(params)(tokens, u, data['tau'])
  q, logits = np.asarray(q, np.float64), np.asarray(logits, np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  kl = np.sum(np.where(q > 0, q * (np.log(np.where(q > 0, q, 1.0)) - logp), 0.0), -1)
  windows = np.arange(n) + k < n
  want = kl[:, windows].mean(axis=(0, 1))
  for i in range(k):
    assert float(metrics[f'loss_{i + 1}']) == pytest.approx(want[i], rel=1e-4)
  assert float(loss) == pytest.approx(want.mean(), rel=1e-4)
  assert want.min() > 0.05  # a random student is far from its teacher: the check is not 0 == 0
  tokens_out = np.asarray(sampling.student_tokens(student.cfg, jnp.asarray(logits, jnp.float32),
                                                  u))
  correct = tokens_out[:, windows] == np.asarray(targets)[:, windows]
  for i in range(k):
    assert float(metrics[f'acc_{i + 1}']) == pytest.approx(correct[..., i].mean(), abs=1e-6)
  assert float(metrics['acc_total']) == pytest.approx(correct.all(-1).mean(), abs=1e-6)


def test_inverse_cdf_readout_refuses_the_argmax_only_terms(tiny_data_config):
  config = tiny_data_config
  config.model.readout = 'inverse_cdf'
  layout = sharding.layout_from_config(config)
  for field, value in (('data_weight', 0.1), ('target_smoothing', 0.2)):
    config.distill[field] = value
    with pytest.raises(ValueError, match='model.readout=inverse_cdf'):
      distill.stage_program(config, layout, 1, None)
    config.distill[field] = 0.0


def test_a_student_loads_only_with_the_readout_it_learned(tmp_path):
  config = test_tiny.get_config()
  config.model.readout = 'inverse_cdf'
  layout = sharding.layout_from_config(config)
  directory = rundir.stage_dir(str(tmp_path), 1)
  student = models.student(config, 1)
  checkpoints.export_params(rundir.params_dir(directory), student.init(jax.random.key(0)),
                            {'kind': 'pflm', 'k': 1})
  provenance.write_run_config(directory, provenance.run_record(config))
  assert rundir.load_export(directory, layout).model.cfg.readout == 'inverse_cdf'
  with pytest.raises(ValueError, match='model.readout='):
    rundir.load_export(directory, layout, config=test_tiny.get_config())
  # a run recorded before the field existed learned the argmax readout
  record = provenance.read_run_config(directory)
  del record['config']['model']['readout']
  provenance.write_run_config(directory, record)
  assert rundir.load_export(directory, layout).model.cfg.readout == 'argmax'
  with pytest.raises(ValueError, match="model.readout='argmax'"):
    rundir.load_export(directory, layout, config=config)
  rundir.load_export(directory, layout, config=test_tiny.get_config())


@pytest.mark.slow
def test_short_inverse_cdf_stage_matches_the_teacher_distribution(tiny_data_config, tmp_path):
  """A short k=1 stage with the inverse-CDF readout: the KL to the teacher falls and held-out
  agreement with the teacher's sample beats the ignore-the-noise baseline E[max p]."""
  config = tiny_data_config
  config.train.steps = 60
  teacher.run(config, str(tmp_path))
  config.model.readout = 'inverse_cdf'
  config.distill.stages = ((1, 150),)
  config.distill.eval_every = 150
  config.distill.log_every = 10
  distill.run(config, str(tmp_path))
  with open(tmp_path / 'student_k1' / 'eval.json') as f:
    saved = json.load(f)
  rows = [json.loads(line) for line in open(tmp_path / 'student_k1' / 'metrics.jsonl')]
  losses = [r['loss_1'] for r in rows if 'loss_1' in r]
  assert losses[-1] < 0.5 * losses[0], losses
  assert saved['acc_total'] > saved['baseline_acc_total'] + 0.1, saved


def test_later_slot_temperature_moves_slots_2_to_k_towards_their_argmax():
  config = test_tiny.get_config()
  config.model.readout = 'inverse_cdf'
  model = models.student(config, 4)
  params = params_lib.random_params(model, 2, head_scale=0.1)
  batch, prefix, gen_len, k = 3, 4, 12, 4
  prompts = jax.random.randint(jax.random.key(4), (batch, prefix), 1, 256, dtype=jnp.int32)
  key = jax.random.key(11)
  run = lambda t: np.asarray(decode.generate_pflm(  # noqa: E731
      model, params, prompts, key, 1.0, gen_len=gen_len, k=k, later_slot_temperature=t))
  np.testing.assert_array_equal(run(1.0), decode.generate_pflm(model, params, prompts, key, 1.0,
                                                               gen_len=gen_len, k=k))
  cold = run(1e-4)
  u = noises(key, batch, gen_len, k)
  logits, _ = model.module(params)(jnp.asarray(cold), u, jnp.ones((batch,)))
  first = np.asarray(sampling.student_tokens(model.cfg, logits[..., :1, :], u[..., :1]))
  rest = np.asarray(jnp.argmax(logits[..., 1:, :], -1))
  for t in range(prefix - 1, gen_len - 1, k):  # slot 1 sampled, slots 2..4 at their argmax
    np.testing.assert_array_equal(cold[:, t + 1], first[:, t, 0], err_msg=f't={t}')
    np.testing.assert_array_equal(cold[:, t + 2:t + 1 + k], rest[:, t, :gen_len - t - 2],
                                  err_msg=f't={t}')
  assert np.mean(cold[:, prefix:] != run(1.0)[:, prefix:]) > 0.3
