"""kforcing_jax.agreement: the AR teacher's own noise -> token map rolled out for all windows at
once, checked against the sampler and against step-by-step full forwards; the agreement counts
against the stage-1 evaluation and on constructed students; the entropy bins."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test_tiny
from kforcing_jax import agreement, distill, models, rundir, sampling, sharding
from kforcing_jax.models.pflm import init_from
from tests.helpers.params import random_params

B, N = 2, 8


def tiny(cdf_order='id'):
  config = test_tiny.get_config()
  config.model.cdf_order = cdf_order
  return config


def held_out(seed, k, n=N):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(1, 256, (B, n)), jnp.int32)
  u = jnp.asarray(rng.random((B, n, k), dtype=np.float32))
  return tokens, u


@pytest.mark.parametrize('cdf_order', ['id', 'sorted'])
def test_rollout_of_one_slot_is_the_samplers_token(cdf_order):
  ar = models.teacher(tiny(cdf_order))
  params = random_params(ar, 0)
  tokens, u = held_out(1, 1)
  got, logits = jax.jit(lambda p, t, x: agreement.ar_noise_rollout(ar, p, t, x, jnp.ones(B)))(
      params, tokens, u)
  teacher_logits, _ = ar.module(params)(tokens)
  np.testing.assert_allclose(logits, teacher_logits, atol=1e-5)
  expected = sampling.inverse_cdf_sample(teacher_logits, u[..., 0], 1.0, cdf_order)
  np.testing.assert_array_equal(got[..., 0], expected)


def test_rollout_equals_step_by_step_full_forwards():
  """Slot j of window t = the sampler on a full causal forward of x_<=t followed by the slots
  sampled before it (a fixed-length sequence, padded: causality hides the padding)."""
  k = 3
  ar = models.teacher(tiny())
  params = random_params(ar, 2)
  tokens, u = held_out(3, k)
  got, _ = jax.jit(lambda p, t, x: agreement.ar_noise_rollout(ar, p, t, x, jnp.ones(B)))(
      params, tokens, u)
  forward = jax.jit(lambda p, seq: ar.module(p)(seq)[0])
  expected = np.zeros((B, N, k), np.int32)
  for t in range(N):
    seq = np.zeros((B, N + k), np.int32)
    seq[:, :t + 1] = tokens[:, :t + 1]
    for j in range(k):
      logits = forward(params, jnp.asarray(seq))[:, t + j]
      expected[:, t, j] = sampling.inverse_cdf_sample(logits, u[:, t, j], 1.0)
      seq[:, t + 1 + j] = expected[:, t, j]
  np.testing.assert_array_equal(got, expected)
  # the later slots really are conditioned on sampled tokens, not a repeat of slot 1
  assert not np.array_equal(got[..., 1], got[..., 0])


def export(model, params, name):
  return rundir.Export(model, params, {}, name)


def test_one_slot_agreement_equals_the_stage_one_evaluation():
  """k = 1: prefix_1 is the stage-1 acc_total (distill.make_stage_eval, an independent
  implementation) and the per-bin E[max p] pools to its ignore-the-noise baseline."""
  config = tiny()
  ar, student = models.teacher(config), models.student(config, 1)
  # a peaked teacher, and a student that starts from it: agreement far from 0 and from 1
  ar_params = random_params(ar, 4, head_scale=1.0)
  student_params, _ = init_from(ar_params, random_params(student, 5), 'ar')
  layout = sharding.single_device_layout()
  tokens, u = held_out(6, 1, n=16)
  mask = np.ones((B, 16), np.float32)
  mask[1, :3] = 0.0  # padding: these windows are left out by both
  batch = {'tokens': tokens, 'mask': jnp.asarray(mask), 'u': u, 'tau': jnp.ones(B)}

  [summary] = agreement.measure(export(ar, ar_params, 'ar'),
                                [export(student, student_params, 's')], layout, [batch])
  teachers = distill.Teachers(export(ar, ar_params, 'ar'), export(ar, ar_params, 'ar'))
  stage = distill.make_stage_eval(student, teachers, 1, [batch])({'params': student_params})

  assert summary['windows'] == stage['windows'] == 2 * 15 - 3
  assert summary['prefix'][0] == pytest.approx(stage['acc_total'], abs=1e-6)
  assert summary['slot'][0] == pytest.approx(stage['acc_total'], abs=1e-6)
  assert 0.05 < summary['slot'][0] < 0.95
  bins = summary['by_entropy']
  assert sum(b['windows'] for b in bins) == summary['windows']
  pooled_mode = sum(b['mode_reference'] * b['windows'] for b in bins if b['windows'])
  assert pooled_mode / summary['windows'] == pytest.approx(stage['baseline_acc_total'], rel=1e-5)
  pooled_agreement = sum(b['agreement_1'] * b['windows'] for b in bins if b['windows'])
  assert pooled_agreement / summary['windows'] == pytest.approx(summary['slot'][0], abs=1e-6)


def constant_head(params, path, token, scale=50.0):
  """params with the head `path` replaced so every position puts its mass on `token`."""
  head = dict(params) if path is None else dict(params[path])
  head['head'] = jnp.zeros_like(head['head'])
  head['head_bias'] = jnp.zeros_like(head['head_bias']).at[token].set(scale)
  return head if path is None else dict(params, **{path: head})


def test_students_that_reproduce_or_miss_a_known_map():
  """A teacher sure of token 7 everywhere (entropy ~0, max p ~1): a student that always emits 7
  agrees on every slot and window; one that always emits 9 never does."""
  config = tiny()
  ar, student = models.teacher(config), models.student(config, 2)
  ar_params = constant_head(random_params(ar, 7), None, 7)
  right = constant_head(random_params(student, 8), 'backbone', 7)
  wrong = constant_head(random_params(student, 8), 'backbone', 9)
  tokens, u = held_out(9, 2)
  batch = {'tokens': tokens, 'mask': jnp.ones((B, N)), 'u': u}
  good, bad = agreement.measure(export(ar, ar_params, 'ar'),
                                [export(student, right, 'r'), export(student, wrong, 'w')],
                                sharding.single_device_layout(), [batch, batch])
  assert good['windows'] == bad['windows'] == 2 * 2 * (N - 2)
  assert good['slot'] == [1.0, 1.0] and good['prefix'] == [1.0, 1.0]
  assert bad['slot'] == [0.0, 0.0] and bad['prefix'] == [0.0, 0.0]
  first = good['by_entropy'][0]
  assert (first['lo'], first['hi'], first['windows']) == (0.0, 1.0, good['windows'])
  assert first['agreement_1'] == first['acc_total'] == 1.0
  assert first['mode_reference'] == pytest.approx(1.0, abs=1e-4)
  assert bad['by_entropy'][0]['acc_total'] == 0.0
  assert all(b['windows'] == 0 and b['agreement_1'] is None for b in good['by_entropy'][1:])
  assert good['by_entropy'][-1]['hi'] is None


def test_entropy_bins_and_entropy():
  edges = agreement.ENTROPY_EDGES
  got = agreement.entropy_bin(jnp.asarray([0.0, 0.5, 1.0, 4.99, 5.0, 7.3]), edges)
  np.testing.assert_array_equal(got, [0, 0, 1, 4, 5, 5])
  entropy, mode = agreement.entropy_and_mode(jnp.zeros((3, 256)))
  np.testing.assert_allclose(entropy, math.log(256), rtol=1e-5)
  np.testing.assert_allclose(mode, 1 / 256, rtol=1e-5)
  # p = (1/2, 1/4, 1/4): 1.5 ln 2
  entropy, mode = agreement.entropy_and_mode(jnp.log(jnp.asarray([0.5, 0.25, 0.25])))
  assert float(entropy) == pytest.approx(1.5 * math.log(2), rel=1e-5)
  assert float(mode) == pytest.approx(0.5)


def test_counts_add_up_over_batches_and_respect_the_window_mask():
  student = jnp.asarray([[[1, 2], [3, 4], [5, 6]]])            # (1, 3, 2)
  reference = jnp.asarray([[[1, 2], [3, 0], [0, 6]]])
  entropy = jnp.asarray([[0.5, 2.5, 9.0]])
  mode = jnp.asarray([[0.9, 0.4, 0.1]])
  windows = jnp.asarray([[True, True, False]])
  c = agreement.Counts(**{key: np.asarray(v, np.float64) for key, v in agreement.window_counts(
      student, reference, entropy, mode, windows).items()})
  s = (c + c).summary()
  assert s['windows'] == 4
  assert s['slot'] == [1.0, 0.5] and s['prefix'] == [1.0, 0.5]
  by_lo = {b['lo']: b for b in s['by_entropy']}
  assert (by_lo[0.0]['windows'], by_lo[0.0]['acc_total'], by_lo[0.0]['mode_reference']) == (
      2, 1.0, pytest.approx(0.9))
  assert (by_lo[2.0]['windows'], by_lo[2.0]['agreement_1'], by_lo[2.0]['acc_total']) == (
      2, 1.0, 0.0)
  assert by_lo[5.0]['windows'] == 0  # the masked window is in no bin
