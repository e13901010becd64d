"""Checkpoints restore onto any topology: a training state saved on a (data 2, fsdp 4) mesh of
8 fake CPU devices restores on a (4, 2) mesh and on one device with exactly the saved values
(bit-for-bit: restoring only moves shards, it never computes), laid out as the abstract target
asks."""

import jax.numpy as jnp
import pytest

from kforcing_jax import checkpoints
from tests.helpers import fake_devices



@pytest.fixture(scope='module')
def resharded(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp('reshard') / 'checkpoints')
  return fake_devices.run_json('tests.helpers.checkpoint_reshard', directory)


def test_the_source_state_is_really_sharded(resharded):
  """Parameters and Adam moments split over fsdp=4, so restoring must really regroup shards."""
  assert any("'fsdp'" in spec for spec in resharded['source_specs'])
  assert any("'fsdp'" in spec for spec in resharded['4,2,1']['specs'])


@pytest.mark.parametrize('target', ['4,2,1', 'one_device'])
def test_restore_on_another_mesh_is_exact(resharded, target):
  result = resharded[target]
  assert len(result['equal']) == resharded['leaves'] > 10
  assert all(result['equal']), result['equal']
  assert result['dtypes_equal']
  assert result['shardings_as_targeted']
  assert result['meta'] == {'kind': 'ar', 'step': 1}
  assert result['devices'] == ([1] if target == 'one_device' else [8])


def test_reexport_replaces_the_params(tmp_path):
  """A run resumed after its export exports again (no 'step already exists' error)."""
  checkpoints.export_params(str(tmp_path), {'w': jnp.ones(3)}, {'version': 1})
  checkpoints.export_params(str(tmp_path), {'w': jnp.zeros(3)}, {'version': 2})
  params, meta = checkpoints.import_params(str(tmp_path), {'w': jnp.ones(3)})
  assert meta == {'version': 2} and float(params['w'].sum()) == 0.0
  assert checkpoints.has_params(str(tmp_path))
  assert not checkpoints.has_params(str(tmp_path / 'missing'))


def test_keep_0_is_refused(tmp_path):
  with pytest.raises(ValueError, match=r'keep_checkpoints must be >= 1 \(got 0\)'):
    checkpoints.Checkpointer(str(tmp_path), keep=0)
  assert list(tmp_path.iterdir()) == []


def test_all_finite_looks_at_every_float_leaf():
  finite = {'w': jnp.ones(3), 'h': jnp.ones(2, jnp.bfloat16), 'count': jnp.int32(7)}
  assert checkpoints.all_finite(finite)
  assert not checkpoints.all_finite(dict(finite, h=jnp.array([1.0, jnp.inf], jnp.bfloat16)))
  assert not checkpoints.all_finite(dict(finite, w=jnp.array([0.0, jnp.nan, 1.0])))
