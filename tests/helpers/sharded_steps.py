"""Run one teacher train step and one k=4 distillation step on several meshes; print JSON.

Executed in a subprocess by tests/test_sharding.py with 8 fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8), since the device count is fixed at
JAX start-up.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from configs import test_tiny
from kforcing_jax import distill, sharding, train, train_state


def batch_arrays(config, k):
  rng = np.random.default_rng(0)
  b, n = 8, config.data.seq_len
  return {'tokens': rng.integers(2, config.model.vocab_size, (b, n)).astype(np.int32),
          'mask': np.ones((b, n), np.float32),
          'u': rng.random((b, n, k), dtype=np.float32),
          'tau': np.ones((b,), np.float32),
          'r': rng.random((b, n, k), dtype=np.float32)}


def summary(tree):
  """First 64 entries and the L2 norm of every leaf: enough to catch any layout mistake."""
  return [np.asarray(x, np.float64).ravel()[:64].tolist() + [float(np.linalg.norm(x))]
          for x in jax.tree.leaves(tree)]


def run_on_mesh(shape):
  config = test_tiny.get_config()
  devices = jax.devices()[:int(np.prod(shape))]
  mesh = sharding.make_mesh(shape, devices)
  rules = sharding.DEFAULT_RULES
  arrays = batch_arrays(config, 4)
  shard = lambda x: jax.device_put(x, sharding.batch_sharding(mesh, x.ndim, rules))  # noqa

  ar = train.teacher_model(config)
  opt = train_state.make_optimizer(config.train, 10)
  abstract = train_state.abstract_train_state(ar, opt, mesh, rules)
  state = train_state.make_init_state(ar, opt, abstract)(jax.random.key(0))
  # a non-zero head, so gradients reach every layer
  state['params']['head'] = jax.device_put(
      0.05 * jax.random.normal(jax.random.key(9), state['params']['head'].shape),
      state['params']['head'].sharding)
  lm_batch = {k: shard(arrays[k]) for k in ('tokens', 'mask')}
  step = train_state.make_train_step(
      lambda p, b: train.lm_loss(ar, p, b), opt, abstract,
      {k: sharding.batch_sharding(mesh, 2, rules) for k in lm_batch}, mesh, rules)
  ar_params = jax.tree.map(jnp.copy, state['params'])
  grads = jax.jit(jax.grad(lambda p, b: train.lm_loss(ar, p, b)[0]))(ar_params, lm_batch)
  state, metrics = step(state, lm_batch)
  out = {'teacher_loss': float(metrics['loss']), 'teacher_grads': summary(grads),
         'teacher_params': summary(state['params'])}

  teacher = distill.student_model(config, 2)
  student = distill.student_model(config, 4)
  t_params = jax.jit(teacher.init, out_shardings=train_state.param_shardings(
      teacher, mesh, rules))(jax.random.key(1))
  t_params['backbone'] = jax.tree.map(jnp.copy, ar_params)
  opt = train_state.make_optimizer(config.distill, 10)
  abstract = train_state.abstract_train_state(student, opt, mesh, rules)
  state = train_state.make_init_state(student, opt, abstract)(jax.random.key(2))
  state['params'] = jax.tree.map(jnp.copy, t_params)
  d_batch = {k: shard(v) for k, v in arrays.items()}
  step = train_state.make_train_step(
      lambda p, b, tp, ap: distill.distill_loss(student, teacher, config.distill, p, b, tp, ap),
      opt, abstract, {k: sharding.batch_sharding(mesh, v.ndim, rules) for k, v in arrays.items()},
      mesh, rules,
      extra_args_shardings=(train_state.param_shardings(teacher, mesh, rules), None))
  grads = jax.jit(jax.grad(lambda p, b, tp: distill.distill_loss(
      student, teacher, config.distill, p, b, tp, None)[0]))(state['params'], d_batch, t_params)
  state, metrics = step(state, d_batch, t_params, None)
  out.update(distill_loss=float(metrics['loss']), distill_acc_total=float(metrics['acc_total']),
             distill_grads=summary(grads), distill_params=summary(state['params']))
  return out


if __name__ == '__main__':
  shapes = [tuple(int(s) for s in arg.split(',')) for arg in sys.argv[1:]]
  print(json.dumps({','.join(map(str, s)): run_on_mesh(s) for s in shapes}))
