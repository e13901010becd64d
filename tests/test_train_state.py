"""Memory knobs that must not change the numbers: gradient accumulation and layer remat."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import test_tiny
from kforcing_jax import distill, models, sharding, teacher, train_state
from kforcing_jax.models import FunctionalModel
from tests.helpers.params import random_params

# float32 sums taken in a different order (per microbatch, or recomputed under remat): each
# gradient agrees to 1e-5 of its tensor's largest entry (elements that are sums of cancelling
# terms differ by a few ulps of that scale); a wrong weighting or a dropped gradient path is
# O(1e-2) or more of it.
SCALE_TOL = 1e-5

def lm_batch(config, rows=8, seed=0):
  """Random tokens with ragged padding, so microbatches hold different target counts."""
  rng = np.random.default_rng(seed)
  n = config.data.seq_len
  lengths = rng.integers(3, n + 1, rows)
  lengths[:2] = (n, 2)  # one full row, one with a single target
  return {'tokens': jnp.asarray(rng.integers(2, config.model.vocab_size, (rows, n)), jnp.int32),
          'mask': jnp.asarray(np.arange(n)[None] < lengths[:, None], jnp.float32)}


def distill_batch(config, k, rows=8):
  rng = np.random.default_rng(1)
  n = config.data.seq_len
  return dict(lm_batch(config, rows),
              u=jnp.asarray(rng.random((rows, n, k)), jnp.float32),
              tau=jnp.ones((rows,), jnp.float32))


def assert_trees_close(actual, desired):
  for x, y in zip(jax.tree.leaves(actual), jax.tree.leaves(desired)):
    y = np.asarray(y)
    np.testing.assert_allclose(np.asarray(x), y, rtol=0, atol=SCALE_TOL * np.abs(y).max())


@pytest.mark.parametrize('microbatches', [2, 4])
def test_gradient_accumulation_equals_full_batch(microbatches):
  config = test_tiny.get_config()
  model = models.teacher(config)
  params = random_params(model, 0)
  batch = lm_batch(config)
  loss_fn = lambda p, b: teacher.lm_loss(model, p, b)  # noqa: E731
  (full_loss, full_metrics), full_grads = jax.jit(
      jax.value_and_grad(loss_fn, has_aux=True))(params, batch)
  loss, metrics, grads = jax.jit(
      lambda p, b: train_state.accumulated_value_and_grad(loss_fn, p, b, (), microbatches,
                                                          'tokens'))(params, batch)
  np.testing.assert_allclose(loss, full_loss, rtol=1e-6)
  assert float(metrics['tokens']) == float(full_metrics['tokens'])
  assert_trees_close(grads, full_grads)
  # a plain mean of the slices' losses would differ: the counts really are unequal
  slices = train_state.split_microbatches(batch, microbatches)
  plain = np.mean([loss_fn(params, jax.tree.map(lambda x: x[m], slices))[0]
                   for m in range(microbatches)])
  assert abs(plain - full_loss) > 1e-3


def test_train_step_with_microbatches_matches_one_batch():
  """The jitted step (optimizer, clipping, metrics) on a 1-device mesh, M = 1 vs M = 4."""
  config = test_tiny.get_config()
  layout = sharding.single_device_layout()
  batch = lm_batch(config)
  results = []
  for microbatches in (1, 4):
    config.train.microbatches = microbatches
    program = teacher.train_program(config, layout)
    state = {'step': jnp.zeros((), jnp.int32), 'params': random_params(program.model, 0)}
    state['opt_state'] = program.optimizer.init(state['params'])
    results.append(program.step(state, batch))
  (state_1, metrics_1), (state_4, metrics_4) = results
  for name in ('loss', 'grad_norm', 'tokens'):
    np.testing.assert_allclose(metrics_4[name], metrics_1[name], rtol=1e-5)
  # Adam's first update is ~lr * sign(g): equal signs everywhere a gradient is not ~0
  np.testing.assert_allclose(np.asarray(state_4['params']['head']),
                             np.asarray(state_1['params']['head']), atol=1e-5)


def test_microbatches_must_divide_the_batch():
  with pytest.raises(ValueError, match='multiple of microbatches'):
    train_state.split_microbatches({'tokens': jnp.zeros((6, 4))}, 4)


def with_remat(model: FunctionalModel, remat: str) -> FunctionalModel:
  return FunctionalModel(dataclasses.replace(model.cfg, remat=remat), model.kind, model.k_max)


@pytest.mark.parametrize('remat', ['full', 'dots'])
def test_remat_keeps_teacher_loss_and_gradients(remat):
  config = test_tiny.get_config()
  model = models.teacher(config)
  params = random_params(model, 0)
  batch = lm_batch(config)
  value_and_grad = lambda m: jax.jit(jax.value_and_grad(  # noqa: E731
      lambda p, b: teacher.lm_loss(m, p, b)[0]))(params, batch)
  loss, grads = value_and_grad(model)
  remat_loss, remat_grads = value_and_grad(with_remat(model, remat))
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  assert_trees_close(remat_grads, grads)


def test_remat_keeps_distill_loss_and_gradients():
  config = test_tiny.get_config()
  student, teacher = models.student(config, 4), models.student(config, 2)
  params, teacher_params = random_params(student, 0), random_params(teacher, 1)
  batch = distill_batch(config, 4)

  def value_and_grad(s, t):
    return jax.jit(jax.value_and_grad(lambda p, b, tp: distill.distill_loss(
        s, t, config.distill, p, b, tp, None)[0]))(params, batch, teacher_params)

  loss, grads = value_and_grad(student, teacher)
  remat_loss, remat_grads = value_and_grad(with_remat(student, 'full'), with_remat(teacher, 'full'))
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  assert_trees_close(remat_grads, grads)


def test_unknown_remat_policy_is_a_config_error():
  config = test_tiny.get_config()
  config.model.remat = 'everything'
  with pytest.raises(ValueError, match='model.remat'):
    models.teacher(config)


@pytest.mark.parametrize('remat', ['none', 'full', 'dots'])
def test_remat_puts_checkpoints_in_the_training_forward(remat):
  # equal numbers alone would also hold if the knob were ignored: the traced gradient must
  # contain one checkpointed region per layer exactly when remat is on
  config = test_tiny.get_config()
  model = with_remat(models.teacher(config), remat)
  params, batch = random_params(model, 0), lm_batch(config)
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: teacher.lm_loss(model, p, batch)[0]))(params))
  expected = 0 if remat == 'none' else config.model.num_layers
  # jax.checkpoint traces to the `remat2` primitive in jax 0.10 (`checkpoint` in some versions)
  assert len(re.findall(r'= (?:remat\w*|checkpoint)\[', jaxpr)) == expected


def test_param_average_is_the_debiased_ema_of_the_parameters_it_produced():
  """After t updates the average is sum_s (1 - d) d^(t-s) p_s / (1 - d^t) over the parameters
  p_1..p_t the updates produced (a float64 reference), whatever the optimizer was initialised
  with; before any update `averaged_params` is the parameters themselves."""
  decay, lr = 0.8, 0.1
  rng = np.random.default_rng(0)
  params = {'w': jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
            'b': jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
  optimizer = optax.chain(optax.sgd(lr), train_state.param_average(decay))
  # initialised from other parameters, as a distillation stage does (it swaps them in after)
  opt_state = optimizer.init(jax.tree.map(lambda x: x + 100.0, params))
  state = {'params': params, 'opt_state': opt_state}
  assert all(np.array_equal(a, p) for a, p in zip(
      jax.tree.leaves(train_state.averaged_params(state)), jax.tree.leaves(params)))
  trajectory = []
  for _ in range(6):
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    trajectory.append(jax.tree.map(lambda x: np.asarray(x, np.float64), params))
  t = len(trajectory)
  for name in params:
    reference = sum((1 - decay) * decay ** (t - s) * trajectory[s - 1][name]
                    for s in range(1, t + 1)) / (1 - decay ** t)
    got = train_state.averaged_params({'params': params, 'opt_state': opt_state})[name]
    np.testing.assert_allclose(np.asarray(got), reference, rtol=0, atol=1e-5)
    # not the last parameters: the average really lags them
    assert np.abs(reference - trajectory[-1][name]).max() > 1e-2


def test_param_average_is_kept_sharded_like_the_parameters():
  """distill.ema_decay puts the average in the optimizer state, where abstract_train_state must
  shard it like the parameters (optax.tree_map_params finds it) - not replicate it."""
  config = test_tiny.get_config()
  config.distill.ema_decay = 0.99
  model = models.student(config, 2)
  layout = sharding.layout_from_config(config)
  optimizer = train_state.make_optimizer(config.distill, 10)
  abstract = train_state.abstract_train_state(model, optimizer, layout.mesh, layout.rules)
  is_average = lambda x: isinstance(x, train_state.ParamAverageState)  # noqa: E731
  averages = [x for x in jax.tree.leaves(abstract['opt_state'], is_leaf=is_average)
              if is_average(x)]
  assert len(averages) == 1
  specs = lambda tree: [x.sharding.spec for x in jax.tree.leaves(tree)]  # noqa: E731
  assert specs(averages[0].average) == specs(abstract['params'])
  assert any(spec != jax.sharding.PartitionSpec() for spec in specs(abstract['params']))
  config.distill.ema_decay = 0.0  # off: no average in the state
  plain = jax.eval_shape(train_state.make_optimizer(config.distill, 10).init, model.param_shapes)
  assert not [x for x in jax.tree.leaves(plain, is_leaf=is_average) if is_average(x)]
