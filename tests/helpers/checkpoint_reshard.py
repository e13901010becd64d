"""Save a training state on a (data 2, fsdp 4) mesh, restore it on (4, 2) and on one device;
print JSON.

Executed in a subprocess by tests/test_checkpoints.py with 8 fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8), since the device count is fixed at
JAX start-up.
"""

import json
import sys

import jax
import numpy as np

from configs import test_tiny
from kforcing_jax import checkpoints, sharding, teacher, train_state
from tests.helpers import params as params_lib


def program_on(shape, devices=None) -> train_state.Program:
  """The teacher's train program (batch 8 x 32) on a `shape` mesh."""
  config = test_tiny.get_config()
  config.mesh_shape = shape
  return teacher.train_program(config, sharding.layout_from_config(config, devices))


def trained_state(shape):
  """One real step from random params, so Adam moments and the step counter are non-trivial."""
  program = program_on(shape)
  model, abstract = program.model, program.abstract_state
  state = train_state.make_init_state(model, program.optimizer, abstract)(jax.random.key(0))
  state['params'] = jax.device_put(params_lib.random_params(model, 0),
                                   train_state.shardings_of(abstract)['params'])
  rng = np.random.default_rng(0)
  batch = {'tokens': rng.integers(1, 256, (8, 32)).astype(np.int32),
           'mask': np.ones((8, 32), np.float32)}
  batch = {k: jax.device_put(v, program.abstract_batch[k].sharding) for k, v in batch.items()}
  state, _ = program.step(state, batch)
  return state


def specs(tree):
  return sorted({str(x.sharding.spec) for x in jax.tree.leaves(tree)})


def main(directory: str) -> dict:
  state = trained_state((2, 4, 1))
  expected = [np.asarray(x) for x in jax.tree.leaves(state)]
  ckpt = checkpoints.Checkpointer(directory)  # asynchronous, as in training
  ckpt.save(1, state, {'kind': 'ar', 'step': 1})
  ckpt.close()
  out = {'source_specs': specs(state), 'leaves': len(expected)}
  for name, shape, devices in (('4,2,1', (4, 2, 1), None),
                               ('one_device', (1, 1, 1), jax.devices()[:1])):
    abstract = program_on(shape, devices).abstract_state
    restored, meta = checkpoints.Checkpointer(directory).restore(1, abstract)
    leaves = jax.tree.leaves(restored)
    out[name] = {
        'meta': meta,
        'equal': [bool(np.array_equal(np.asarray(a), b)) for a, b in zip(leaves, expected)],
        'dtypes_equal': all(np.asarray(a).dtype == b.dtype for a, b in zip(leaves, expected)),
        'shardings_as_targeted': all(
            a.sharding == t.sharding for a, t in zip(leaves, jax.tree.leaves(abstract))),
        'devices': sorted({len(a.sharding.device_set) for a in leaves}),
        'specs': specs(restored)}
  return out


if __name__ == '__main__':
  print(json.dumps(main(sys.argv[1])))
