"""Decoding sharded over the batch (params by the rules) == decoding on one device.

On 8 fake CPU devices: `decode.sharded_decoder` for the AR loop and the k=4 PFLM loop with a
frequency penalty, on meshes (8,1,1) (pure data parallel) and (2,2,2) (data, fsdp and tensor
parallel: KV caches split by heads, logits by vocabulary), against the plain jitted loops on
one device. A batch of 3 does not divide the batch axes and is replicated.
"""

import numpy as np
import pytest
from jax.sharding import PartitionSpec

from tests.helpers import fake_devices

pytestmark = pytest.mark.slow  # 8 fake devices in a subprocess

RUNS = ('1:8', '8,1,1:8', '2,2,2:8', '1:3', '2,2,2:3')
# float32 matmuls split over fsdp/tensor devices sum in another order: logits agree to ~2e-6
# (measured 1.8e-6); a layout bug (wrong rows, wrong cache slots) is O(1).
LOGIT_ATOL = 2e-5


@pytest.fixture(scope='module')
def decoded():
  return fake_devices.run_json('tests.helpers.sharded_decode', *RUNS)


@pytest.mark.parametrize('run', ['8,1,1:8', '2,2,2:8', '2,2,2:3'])
def test_sharded_decode_equals_one_device(decoded, run):
  reference = decoded['1:' + run.split(':')[1]]
  result = decoded[run]
  np.testing.assert_array_equal(result['ar_tokens'], reference['ar_tokens'])
  np.testing.assert_array_equal(result['pflm_tokens'], reference['pflm_tokens'])
  np.testing.assert_allclose(result['ar_logits'], reference['ar_logits'], rtol=0,
                             atol=LOGIT_ATOL)


def test_outputs_are_split_over_the_batch_unless_it_does_not_divide(decoded):
  assert decoded['8,1,1:8']['tokens_spec'] == str(PartitionSpec('data', None))
  assert decoded['2,2,2:8']['pflm_spec'] == str(PartitionSpec(('data', 'fsdp'), None))
  assert decoded['2,2,2:8']['logits_spec'] == str(PartitionSpec(('data', 'fsdp'), None, 'tensor'))
  assert decoded['2,2,2:3']['tokens_spec'] == str(PartitionSpec(None, None))


def test_decodes_are_not_trivial(decoded):
  """Rows differ and the generated parts vary, so equality above compares real decoding."""
  for kind in ('ar_tokens', 'pflm_tokens'):
    tokens = np.asarray(decoded['1:8'][kind])
    assert len({tuple(row) for row in tokens.tolist()}) == len(tokens)
    assert len(np.unique(tokens[:, 6:])) > 20
