"""coupling.py: the exact interval overlap is what the samplers do on a fine grid of noises,
and the Gumbel-max estimate sits between its guarantee and the maximal coupling."""

import jax.numpy as jnp
import numpy as np
import pytest

from kforcing_jax import coupling, sampling


def _pair(seed, rows=6, vocab=40):
  rng = np.random.default_rng(seed)
  p = rng.dirichlet(np.full(vocab, 0.5), size=rows)
  q = p * np.exp(0.4 * rng.standard_normal(p.shape))
  q[:, 3] = 0.0                                       # a token the student rules out
  return p / p.sum(-1, keepdims=True), q / q.sum(-1, keepdims=True)


@pytest.mark.parametrize('order', ['id', 'sorted'])
def test_overlap_is_the_samplers_agreement_on_a_grid(order):
  p, q = _pair(0)
  grid = (np.arange(20000) + 0.5) / 20000
  u = jnp.asarray(np.broadcast_to(grid[:, None], (len(grid), len(p))), jnp.float32)
  sample = lambda r: np.asarray(sampling.inverse_cdf_from_probs(  # noqa: E731
      jnp.asarray(np.broadcast_to(r, (len(grid),) + r.shape), jnp.float32), u, order))
  on_grid = (sample(p) == sample(q)).mean(0)
  # a grid point is off only where an interval edge falls between it and its neighbour
  np.testing.assert_allclose(coupling.interval_overlap(p, q, order), on_grid, atol=2 * 40 / 20000)


def test_identical_distributions_agree_everywhere_and_disjoint_never():
  p, _ = _pair(1)
  for order in ('id', 'sorted'):
    np.testing.assert_allclose(coupling.interval_overlap(p, p, order), 1.0, atol=1e-12)
  a = np.array([[0.5, 0.5, 0.0, 0.0]])
  b = np.array([[0.0, 0.0, 0.5, 0.5]])
  assert coupling.interval_overlap(a, b, 'id')[0] == 0.0
  assert coupling.window_rows(a, b, np.zeros(1))['maximal'][0] == 0.0


def test_gumbel_estimate_between_guarantee_and_maximal():
  p, q = _pair(2, rows=32, vocab=300)
  noises = jnp.asarray(np.random.default_rng(3).random(2000, dtype=np.float32))
  g = np.asarray(coupling.gumbel_agreement(jnp.asarray(p, jnp.float32),
                                           jnp.asarray(q, jnp.float32), noises))
  rows = coupling.window_rows(p, q, g)
  # 2000 noises x 32 rows: the mean's standard error is below 0.003
  assert rows['gumbel_guarantee'].mean() - 0.01 <= g.mean() <= rows['maximal'].mean() + 0.01
  assert g.mean() > rows['id'].mean() + 0.1
  assert rows['kl_teacher_student'].min() > 0 and np.isinf(rows['kl_student_teacher']).sum() == 0


@pytest.mark.slow
def test_measure_on_a_run_splits_windows_at_the_trained_length(tiny_data_config, tmp_path):
  """A tiny distributional k=1 run: every held-out window is counted once, on its side of the
  stage's trained length, and no coupling beats the maximal one."""
  from kforcing_jax import data, distill, sharding
  from tests.helpers.runs import teacher_then_k1_stage
  config = tiny_data_config
  config.model.readout = 'inverse_cdf'
  config.distill.seq_len = config.data.seq_len // 2
  teacher_then_k1_stage(config, tmp_path, 4, 4)
  result = coupling.measure(config, str(tmp_path), batches=1, noises=16)
  assert result['split_at'] == config.data.seq_len // 2
  whole = config.copy_and_resolve_references()
  whole.distill.seq_len = whole.data.seq_len
  batch = distill.stage_batches(whole, sharding.layout_from_config(whole), 1, 'validation',
                                False, distill.VALIDATION_SEED_OFFSET,
                                data.prepared_tokenizer(whole))(0)
  assert (result['trained']['windows'] + result['beyond']['windows']
          == int(distill.window_mask(batch['mask'], 1).sum()))
  for part in ('trained', 'beyond'):
    m = result[part]
    assert max(m['id'], m['sorted'], m['gumbel']) <= m['maximal'] + 0.05
    assert 0 < m['tv'] < 1 and m['kl_teacher_student'] > 0
