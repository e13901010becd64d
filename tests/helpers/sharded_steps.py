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
from kforcing_jax import distill, models, sharding, teacher, train_state


def batch_arrays(config, k):
  rng = np.random.default_rng(0)
  b, n = 8, config.data.seq_len
  return {'tokens': rng.integers(2, config.model.vocab_size, (b, n)).astype(np.int32),
          'mask': np.ones((b, n), np.float32),
          'u': rng.random((b, n, k), dtype=np.float32),
          'tau': np.ones((b,), np.float32),
          'r': rng.random((b, n, k), dtype=np.float32),
          'half_width': np.zeros((b,), np.float32)}


def summary(tree):
  """First 64 entries and the L2 norm of every leaf: enough to catch any layout mistake."""
  return [np.asarray(x, np.float64).ravel()[:64].tolist() + [float(np.linalg.norm(x))]
          for x in jax.tree.leaves(tree)]


def put(arrays: dict, abstract_batch: dict) -> dict:
  return {k: jax.device_put(arrays[k], x.sharding) for k, x in abstract_batch.items()}


def run_on_mesh(shape):
  config = test_tiny.get_config()
  config.mesh_shape = shape
  layout = sharding.layout_from_config(config, jax.devices()[:int(np.prod(shape))])
  arrays = batch_arrays(config, 4)

  program = teacher.train_program(config, layout)
  ar = program.model
  state = train_state.make_init_state(ar, program.optimizer,
                                      program.abstract_state)(jax.random.key(0))
  # a non-zero head, so gradients reach every layer
  state['params']['head'] = jax.device_put(
      0.05 * jax.random.normal(jax.random.key(9), state['params']['head'].shape),
      state['params']['head'].sharding)
  lm_batch = put(arrays, program.abstract_batch)
  ar_params = jax.tree.map(jnp.copy, state['params'])
  grads = jax.jit(jax.grad(lambda p, b: teacher.lm_loss(ar, p, b)[0]))(ar_params, lm_batch)
  state, metrics = program.step(state, lm_batch)
  out = {'teacher_loss': float(metrics['loss']), 'teacher_grads': summary(grads),
         'teacher_params': summary(state['params'])}

  program = distill.stage_program(config, layout, 4, 2)
  student, k2 = program.model, models.student(config, 2)
  t_params = jax.jit(k2.init, out_shardings=layout.param_shardings(k2))(jax.random.key(1))
  t_params['backbone'] = jax.tree.map(jnp.copy, ar_params)
  state = train_state.make_init_state(student, program.optimizer,
                                      program.abstract_state)(jax.random.key(2))
  state['params'] = jax.tree.map(jnp.copy, t_params)
  d_batch = put(arrays, program.abstract_batch)
  grads = jax.jit(jax.grad(lambda p, b, tp: distill.distill_loss(
      student, k2, config.distill, p, b, tp, None)[0]))(state['params'], d_batch, t_params)
  state, metrics = program.step(state, d_batch, t_params, None)
  out.update(distill_loss=float(metrics['loss']), distill_acc_total=float(metrics['acc_total']),
             distill_grads=summary(grads), distill_params=summary(state['params']))
  return out


if __name__ == '__main__':
  shapes = [tuple(int(s) for s in arg.split(',')) for arg in sys.argv[1:]]
  print(json.dumps({','.join(map(str, s)): run_on_mesh(s) for s in shapes}))
