"""Decode the same prompts on one device and with `decode.sharded_decoder` on several meshes;
print JSON.

Executed in a subprocess by tests/test_decode_sharding.py with 8 fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8), since the device count is fixed at
JAX start-up.
"""

import json
import sys

import jax
import numpy as np

from configs import test_tiny
from kforcing_jax import decode, models, sharding
from tests.helpers import params as params_lib

PREFIX_LEN = 6
GEN_LEN = 19        # 13 new tokens: the last k=4 step runs past the end
K = 4
FREQ_PENALTY = 0.5
HEAD_SCALE = 0.1    # logits of std ~1: diverse samples, few near-ties


def models_and_params():
  config = test_tiny.get_config()
  ar = models.teacher(config)
  student = models.student(config, K)
  return ((ar, params_lib.random_params(ar, 0, head_scale=HEAD_SCALE)),
          (student, params_lib.random_params(student, 1, head_scale=HEAD_SCALE)))


def prompts(batch: int) -> np.ndarray:
  return np.random.default_rng(batch).integers(1, 256, (batch, PREFIX_LEN)).astype(np.int32)


def unsharded(batch: int) -> dict:
  """The plain jitted loops on one device: the reference."""
  (ar, ar_params), (student, student_params) = models_and_params()
  key = jax.random.key(3)
  tokens, logits = decode.generate_ar(ar, ar_params, prompts(batch), key, 1.0, gen_len=GEN_LEN,
                                      return_logits=True)
  pflm = decode.generate_pflm(student, student_params, prompts(batch), key, 1.0,
                              gen_len=GEN_LEN, k=K, freq_penalty=FREQ_PENALTY)
  return {'ar_tokens': np.asarray(tokens).tolist(), 'ar_logits': np.asarray(logits).tolist(),
          'pflm_tokens': np.asarray(pflm).tolist()}


def sharded(shape, batch: int) -> dict:
  """sharded_decoder on `shape`, parameters placed by the rules; also the output layouts."""
  layout = sharding.Layout(sharding.make_mesh(shape))
  mesh, rules = layout.mesh, layout.rules
  (ar, ar_params), (student, student_params) = models_and_params()
  ar_params = jax.device_put(ar_params, layout.param_shardings(ar))
  student_params = jax.device_put(student_params, layout.param_shardings(student))
  key = jax.random.key(3)
  ar_decode = decode.sharded_decoder(ar, mesh, rules, 'ar', gen_len=GEN_LEN, return_logits=True)
  pflm_decode = decode.sharded_decoder(student, mesh, rules, 'pflm', gen_len=GEN_LEN, k=K,
                                       freq_penalty=FREQ_PENALTY)
  tokens, logits = ar_decode(ar_params, prompts(batch), key, 1.0)
  pflm = pflm_decode(student_params, prompts(batch), key, 1.0)
  return {'ar_tokens': decode.to_host(tokens).tolist(),
          'ar_logits': decode.to_host(logits).tolist(),
          'pflm_tokens': decode.to_host(pflm).tolist(),
          'tokens_spec': str(tokens.sharding.spec), 'pflm_spec': str(pflm.sharding.spec),
          'logits_spec': str(logits.sharding.spec)}


if __name__ == '__main__':
  out = {}
  for arg in sys.argv[1:]:  # "1" (unsharded) or "D,F,T" mesh shapes, then ":batch"
    what, batch = arg.split(':')
    out[arg] = (unsharded(int(batch)) if what == '1' else
                sharded(tuple(int(s) for s in what.split(',')), int(batch)))
  print(json.dumps(out))
