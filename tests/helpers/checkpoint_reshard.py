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
from kforcing_jax import checkpoints, sharding, train, train_state
from tests.helpers import params as params_lib

RULES = sharding.DEFAULT_RULES


def abstract_state(mesh):
  config = test_tiny.get_config()
  model = train.teacher_model(config)
  optimizer = train_state.make_optimizer(config.train, 10)
  return model, optimizer, train_state.abstract_train_state(model, optimizer, mesh, RULES)


def trained_state(mesh):
  """One real step from random params, so Adam moments and the step counter are non-trivial."""
  model, optimizer, abstract = abstract_state(mesh)
  state = train_state.make_init_state(model, optimizer, abstract)(jax.random.key(0))
  state['params'] = jax.device_put(params_lib.random_params(model, 0),
                                   train_state.shardings_of(abstract)['params'])
  rng = np.random.default_rng(0)
  batch_sh = sharding.batch_sharding(mesh, 2, RULES)
  batch = {'tokens': jax.device_put(rng.integers(1, 256, (8, 32)).astype(np.int32), batch_sh),
           'mask': jax.device_put(np.ones((8, 32), np.float32), batch_sh)}
  step = train_state.make_train_step(lambda p, b: train.lm_loss(model, p, b), optimizer,
                                     abstract, {k: batch_sh for k in batch}, mesh, RULES)
  state, _ = step(state, batch)
  return state


def specs(tree):
  return sorted({str(x.sharding.spec) for x in jax.tree.leaves(tree)})


def main(directory: str) -> dict:
  source_mesh = sharding.make_mesh((2, 4, 1))
  state = trained_state(source_mesh)
  expected = [np.asarray(x) for x in jax.tree.leaves(state)]
  ckpt = checkpoints.Checkpointer(directory)  # asynchronous, as in training
  ckpt.save(1, state, {'kind': 'ar', 'step': 1})
  ckpt.close()
  out = {'source_specs': specs(state), 'leaves': len(expected)}
  for name, mesh in (('4,2,1', sharding.make_mesh((4, 2, 1))),
                     ('one_device', sharding.make_mesh((1, 1, 1), jax.devices()[:1]))):
    _, _, abstract = abstract_state(mesh)
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
