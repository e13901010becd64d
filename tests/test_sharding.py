"""Sharded == single device: teacher and k=4 distillation steps on 8 fake CPU devices."""

import numpy as np
import pytest

from kforcing_jax import sharding
from tests.helpers import fake_devices

MESHES = ('1,1,1', '8,1,1', '2,4,1', '2,2,2')
# float32 reductions split over devices sum in a different order: agreement to ~1e-6
# relative is expected, anything like a layout bug is O(1).
RTOL, ATOL = 2e-5, 2e-6


@pytest.fixture(scope='module')
def mesh_results():
  return fake_devices.run_json('tests.helpers.sharded_steps', *MESHES, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize('mesh', MESHES[1:])
@pytest.mark.parametrize('what', ['teacher', 'distill'])
def test_sharded_step_matches_single_device(mesh_results, mesh, what):
  single, sharded = mesh_results['1,1,1'], mesh_results[mesh]
  np.testing.assert_allclose(sharded[f'{what}_loss'], single[f'{what}_loss'], rtol=1e-5)
  for kind in ('grads', 'params'):
    for a, b in zip(single[f'{what}_{kind}'], sharded[f'{what}_{kind}']):
      np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL)


def test_mesh_shape_fill_and_errors():
  assert sharding.resolve_mesh_shape((-1, 2, 1), 8) == (4, 2, 1)
  with pytest.raises(ValueError, match='at most one axis'):
    sharding.resolve_mesh_shape((-1, -1, 1), 8)
  with pytest.raises(ValueError, match='needs 6 devices'):
    sharding.resolve_mesh_shape((2, 3, 1), 8)


def test_logical_rules_drop_reused_and_undividable_axes():
  names = ('batch', 'length', 'embed')
  assert sharding.logical_to_spec(names) == sharding.PartitionSpec(('data', 'fsdp'), None, None)
  assert sharding.logical_to_spec(('embed', 'mlp')) == sharding.PartitionSpec('fsdp', 'tensor')
