"""Stage targets, the self-forcing double forward, student init, and a short real stage."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kforcing_jax import decode, distill, sampling
from kforcing_jax.models import BackboneConfig, FunctionalModel
from kforcing_jax.models.pflm import init_from
from tests.helpers.runs import teacher_then_k1_stage

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
  check_double_forward(teacher, params, m)


def check_double_forward(teacher, params, m):
  """The stage-2m targets of a stage-m teacher equal decoding each window with it, k = m."""
  batch, n = 2, 9
  tokens = jax.random.randint(jax.random.key(3), (batch, n), 1, teacher.cfg.num_real_tokens)
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
  results = teacher_then_k1_stage(config, tmp_path, 60, 300, eval_batches=4)
  with open(tmp_path / 'student_k1' / 'eval.json') as f:
    saved = json.load(f)
  assert saved['k'] == 1 and saved['steps'] == 300 and len(saved['acc']) == 1
  assert saved['acc_total'] == pytest.approx(results[1]['acc_total'])
  assert saved['acc'][0] > saved['baseline_acc_total'] + 0.05, saved


def _soft(ar, params, tokens, u, h):
  return distill.soft_ar_targets(ar, params, tokens, u, jnp.ones((tokens.shape[0],)),
                                 jnp.full((tokens.shape[0],), h, jnp.float32))


def test_soft_targets_at_zero_width_are_the_hard_targets():
  ar, params = random_ar()
  tokens = jax.random.randint(jax.random.key(2), (2, 9), 1, 64)
  u = jax.random.uniform(jax.random.key(3), (2, 9, 1))
  hard, q = _soft(ar, params, tokens, u, 0.0)
  np.testing.assert_array_equal(hard, distill.ar_targets(ar, params, tokens, u, jnp.ones((2,))))
  np.testing.assert_array_equal(np.asarray(q).argmax(-1), np.asarray(hard[..., 0]))
  np.testing.assert_allclose(np.asarray(q).max(-1), 1.0)


def test_soft_targets_cover_the_window_and_widen_to_the_teacher_distribution():
  ar, params = random_ar()
  tokens = jax.random.randint(jax.random.key(2), (2, 9), 1, 64)
  u = jax.random.uniform(jax.random.key(3), (2, 9, 1), minval=0.2, maxval=0.8)
  logits, _ = ar.module(params)(tokens)
  probs = np.asarray(sampling.probabilities(logits))
  _, full = _soft(ar, params, tokens, u, 1.0)       # [u - 1, u + 1] covers [0, 1]
  np.testing.assert_allclose(np.asarray(full), probs, atol=1e-6)
  hard, q = _soft(ar, params, tokens, u, 0.05)
  q = np.asarray(q)
  np.testing.assert_allclose(q.sum(-1), 1.0, rtol=1e-5)
  # the hard target's token gets mass, and only tokens whose interval meets [u-h, u+h] do
  assert np.all(np.take_along_axis(q, np.asarray(hard), -1) > 0)
  cdf = np.cumsum(probs, -1)
  lo = cdf - probs
  uu = np.asarray(u)
  outside = (lo >= uu + 0.05 + 1e-6) | (cdf <= uu - 0.05 - 1e-6)
  assert np.all(q[outside] == 0)
  # reference for one window: overlap lengths of [u-h, u+h] with each interval, normalised
  b, t = 1, 4
  ref = np.clip(np.minimum(cdf[b, t], uu[b, t, 0] + 0.05)
                - np.maximum(lo[b, t], uu[b, t, 0] - 0.05), 0, None)
  np.testing.assert_allclose(q[b, t], ref / ref.sum(), atol=2e-5)


def test_smoothing_half_width_schedule():
  class Dc(dict):
    get = dict.get
  dc = Dc(target_smoothing=0.1, smoothing_decay=0.5)
  assert distill.smoothing_half_width(dc, 1, 0, 100) == pytest.approx(0.1)
  assert distill.smoothing_half_width(dc, 1, 25, 100) == pytest.approx(0.05)
  assert distill.smoothing_half_width(dc, 1, 50, 100) == 0.0
  assert distill.smoothing_half_width(dc, 2, 0, 100) == 0.0   # k > 1: rollout targets are hard
  assert distill.smoothing_half_width(Dc(target_smoothing=0.0), 1, 0, 100) == 0.0


def test_sorted_order_reaches_targets_and_noise_inversion():
  # the model's cdf_order is the one order of the k=1 targets, the AR decoder and the inversion
  sorted_cfg = dataclasses.replace(CFG, cdf_order='sorted')
  ar = FunctionalModel(sorted_cfg, 'ar')
  _, params = random_ar()
  prompts = jax.random.randint(jax.random.key(1), (3, 4), 1, 64)
  key = jax.random.key(7)
  tokens = decode.generate_ar(ar, params, prompts, key, 1.0, gen_len=16)
  u = decode.position_uniforms(key, jnp.arange(1, 17), 3)[..., None]
  targets = distill.ar_targets(ar, params, tokens, u, jnp.ones((3,)))
  np.testing.assert_array_equal(targets[:, 3:15, 0], tokens[:, 4:])
  by_id = decode.generate_ar(FunctionalModel(CFG, 'ar'), params, prompts, key, 1.0, gen_len=16)
  assert np.mean(np.asarray(by_id)[:, 4:] != np.asarray(tokens)[:, 4:]) > 0.3
  r = jax.random.uniform(jax.random.key(8), (3, 16, 1))
  u_inv, real, valid = distill.inverted_noise(ar, params, tokens, 1, r, jnp.ones((3,)))
  again = distill.ar_targets(ar, params, tokens, u_inv, jnp.ones((3,)))
  np.testing.assert_array_equal(np.asarray(again)[valid], np.asarray(real)[valid])


def test_soft_loss_in_the_stage_loss_spans_hard_ce_to_teacher_ce():
  import ml_collections
  ar, params = random_ar()
  student, s_params = random_student(1, params)
  dc = ml_collections.ConfigDict({'data_weight': 0.0, 'target_smoothing': 0.1})
  tokens = jax.random.randint(jax.random.key(2), (2, 9), 1, 64)
  batch = {'tokens': tokens, 'mask': jnp.ones((2, 9)), 'u': jax.random.uniform(
      jax.random.key(3), (2, 9, 1)), 'tau': jnp.ones((2,))}
  loss = lambda h: distill.distill_loss(  # noqa: E731
      student, ar, dc, s_params, dict(batch, half_width=jnp.full((2,), h)), params, None)
  hard_loss, hard_metrics = loss(0.0)
  np.testing.assert_allclose(hard_loss, hard_metrics['loss_1'], rtol=1e-6)
  full_loss, metrics = loss(1.0)
  logits, _ = student.module(s_params)(tokens, batch['u'], batch['tau'])
  logp = jax.nn.log_softmax(logits[:, :, 0], -1)
  q = sampling.probabilities(ar.module(params)(tokens)[0])
  w = distill.window_mask(batch['mask'], 1)
  want = -jnp.sum(jnp.sum(q * logp, -1) * w) / w.sum()
  np.testing.assert_allclose(full_loss, want, rtol=1e-5)
  assert float(metrics['half_width']) == 1.0 and abs(float(full_loss - hard_loss)) > 1e-3


def test_stage_program_lowers_with_soft_targets_and_refuses_them_in_sorted_order():
  from configs import test_tiny
  from kforcing_jax import sharding
  config = test_tiny.get_config()
  config.distill.target_smoothing = 0.05
  program = distill.stage_program(config, sharding.single_device_layout(), 1, None)
  assert program.abstract_batch['half_width'].shape == (config.distill.batch_size,)
  program.lower()
  config.model.cdf_order = 'sorted'
  with pytest.raises(ValueError, match='cdf_order=id'):
    distill.stage_program(config, sharding.single_device_layout(), 1, None)


def later_stage_loss(m, n):
  """A random stage-2m student over a random stage-m teacher on one batch of n-token rows:
  (loss(**distill fields) -> (loss, metrics), (teacher, its params, student, its params, batch))."""
  import ml_collections
  ar, ar_params = random_ar()
  teacher, t_params = random_student(m, ar_params)
  student, s_params = random_student(2 * m, ar_params, seed=2)
  tokens = jax.random.randint(jax.random.key(2), (2, n), 1, 64)
  batch = {'tokens': tokens, 'mask': jnp.ones((2, n)), 'tau': jnp.ones((2,)),
           'u': jax.random.uniform(jax.random.key(3), (2, n, 2 * m))}

  def loss(**fields):
    dc = ml_collections.ConfigDict(dict({'data_weight': 0.0}, **fields))
    return distill.distill_loss(student, teacher, dc, s_params, batch, t_params, None)

  return loss, (teacher, t_params, student, s_params, batch)


def test_logit_matching_mixes_hard_targets_with_the_teachers_softmax():
  stage_loss, (teacher, t_params, student, s_params, batch) = later_stage_loss(1, 9)
  loss = lambda alpha: stage_loss(logit_matching=alpha)  # noqa: E731
  tokens = batch['tokens']
  hard, hard_metrics = loss(0.0)
  np.testing.assert_allclose(hard, (hard_metrics['loss_1'] + hard_metrics['loss_2']) / 2,
                             rtol=1e-6)
  assert 'match_loss' not in hard_metrics
  full, metrics = loss(1.0)
  # the teacher's softmax along its own rollout, computed here slot by slot
  targets, t_logits = distill.student_rollout(teacher, t_params, tokens, batch['u'],
                                              batch['tau'])
  logits, _ = student.module(s_params)(tokens, batch['u'], batch['tau'])
  w = distill.window_mask(batch['mask'], 2)
  want = np.mean([-jnp.sum(jnp.sum(jax.nn.softmax(t_logits[:, :, i], -1)
                                   * jax.nn.log_softmax(logits[:, :, i], -1), -1) * w) / w.sum()
                  for i in range(2)])
  np.testing.assert_allclose(full, want, rtol=1e-5)
  np.testing.assert_allclose(metrics['match_loss'], want, rtol=1e-5)
  # the hard-target metrics do not change with the mix, and half-and-half is the midpoint
  np.testing.assert_allclose(metrics['loss_2'], hard_metrics['loss_2'], rtol=1e-6)
  half, _ = loss(0.5)
  np.testing.assert_allclose(half, (hard + full) / 2, rtol=1e-5)
  assert abs(float(full - hard)) > 1e-3


def test_later_learning_rate_applies_to_stages_after_k1_only():
  from configs import test_tiny
  config = test_tiny.get_config()
  dc = config.distill
  assert distill.stage_optimizer_config(dc, 2) is dc  # 0 = the same lr everywhere
  dc.later_learning_rate = dc.learning_rate / 7
  assert distill.stage_optimizer_config(dc, 1).learning_rate == dc.learning_rate
  later = distill.stage_optimizer_config(dc, 4)
  assert later.learning_rate == dc.learning_rate / 7 and later.b2 == dc.b2
  assert dc.learning_rate != later.learning_rate  # the config itself is left as it was


def test_logit_matching_is_checked():
  from configs import test_tiny
  from kforcing_jax import config_checks
  config = test_tiny.get_config()
  config.distill.logit_matching = 1.5
  with pytest.raises(ValueError, match='distill.logit_matching'):
    config_checks.check(config)
  config.distill.logit_matching = 0.5
  config.model.readout = 'inverse_cdf'
  with pytest.raises(ValueError, match='logit_matching'):
    config_checks.check(config)


def test_inherited_slot_weight_reweights_the_stage_loss():
  import ml_collections
  stage_loss, _ = later_stage_loss(2, 11)
  loss = lambda weight, alpha=0.0: stage_loss(  # noqa: E731
      logit_matching=alpha, inherited_slot_weight=weight)

  plain, m = loss(1.0)
  np.testing.assert_allclose(plain, np.mean([m[f'loss_{i}'] for i in range(1, 5)]), rtol=1e-6)
  heavy, m3 = loss(3.0)  # slots 1-2 (inherited) weigh 3, slots 3-4 weigh 1: (3a + 3b + c + d) / 8
  want = (3 * m['loss_1'] + 3 * m['loss_2'] + m['loss_3'] + m['loss_4']) / 8
  np.testing.assert_allclose(heavy, want, rtol=1e-6)
  assert float(m3['loss_1']) == float(m['loss_1'])  # per-slot metrics stay unweighted
  np.testing.assert_allclose(distill.slot_weights(ml_collections.ConfigDict(
      {'inherited_slot_weight': 3.0}), 2), [0.75, 0.25])
  # the weights apply to the matching term as well
  matched, mm = loss(3.0, alpha=1.0)
  assert abs(float(matched - mm['match_loss'])) > 1e-4


@pytest.mark.slow
def test_stage_with_ema_evaluates_and_exports_the_parameter_average(tiny_data_config, tmp_path):
  """distill.ema_decay > 0: the stage's export is the average the optimizer kept (not its last
  parameters) and its eval.json is that average's held-out agreement."""
  from kforcing_jax import checkpoints, rundir, sharding, train_state
  config = tiny_data_config
  teacher_then_k1_stage(config, tmp_path, 4, 6, ema_decay=0.5, checkpoint_every=6)
  layout = sharding.layout_from_config(config)
  program = distill.stage_program(config, layout, 1, None)
  stage_dir = rundir.stage_dir(str(tmp_path), 1)
  ckpt = checkpoints.Checkpointer(f'{stage_dir}/checkpoints', async_save=False)
  state, _ = ckpt.restore(6, program.abstract_state)
  exported = checkpoints.import_params(rundir.params_dir(stage_dir),
                                       program.abstract_state['params'])
  average = train_state.averaged_params(state)
  for got, want, last in zip(jax.tree.leaves(exported), jax.tree.leaves(average),
                             jax.tree.leaves(state['params'])):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert max(float(jnp.abs(a - p).max()) for a, p in zip(
      jax.tree.leaves(average), jax.tree.leaves(state['params']))) > 1e-4
  teachers = distill.load_teachers(config, str(tmp_path), layout, None)
  val_at = distill.stage_batches(config, layout, 1, 'validation', False,
                                 distill.VALIDATION_SEED_OFFSET)
  evaluate = distill.make_stage_eval(program.model, teachers, 1,
                                     [val_at(i) for i in range(config.distill.eval_batches)])
  with open(tmp_path / 'student_k1' / 'eval.json') as f:
    saved = json.load(f)
  assert saved['acc_total'] == pytest.approx(evaluate(state)['acc_total'], abs=1e-9)
