"""One-process before/after of the k-token step's last-layer trim (random demo-size weights):
'before' = every slot through the whole last layer, the pending tokens' outputs then dropped
(decode.pflm_step as of c80cf74, rebuilt here from decode.window_step); 'after' = the current
decode.pflm_step, whose last layer gives the pending tokens K/V only. AR and k=4 interleaved,
medians of REPS rounds; tokens compared.

  PYTHONPATH=. .venv/bin/python results/decode_profile/last_layer_ab.py REPS BATCH...
"""
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import shakespeare_tiny
from kforcing_jax import decode, models, sharding
from kforcing_jax.benchmarks.decode_speed import random_export


def old_pflm_step(backbone, cache, pending, start, hints, u, counts, freq_penalty, active,
                  later_slot_temperature=1.0, student=None):  # the demo has no token feedback
  k = pending.shape[1]
  slots = jnp.concatenate([backbone.embed_tokens(pending), hints], axis=1)
  hidden, cache = decode.window_step(backbone, cache, start, slots, start + jnp.arange(2 * k), k)
  tokens, counts = decode.penalized_readout(backbone.logits(hidden[:, k:]), counts, freq_penalty,
                                            active, u, backbone.cfg.readout,
                                            backbone.cfg.cdf_order, later_slot_temperature)
  return tokens, counts, cache


NEW = decode.pflm_step


def use(step):
  decode.pflm_step = step


config = shakespeare_tiny.get_config()
layout = sharding.layout_from_config(config)
ar = random_export(models.teacher(config), layout, 0)
st = random_export(models.student(config, 4), layout, 4, ar.params)
decs = {}
for tag, step in (('before', old_pflm_step), ('after', NEW)):
  use(step)
  decs['ar_' + tag] = (decode.decoder(ar, layout, gen_len=128, eos_id=None, temperature=1.0),
                       step)
  decs['k4_' + tag] = (decode.decoder(st, layout, gen_len=128, eos_id=None, penalty=0.5), step)
key = jax.random.key(0)
reps = int(sys.argv[1])
for batch in [int(b) for b in sys.argv[2:]]:
  prompts = jnp.asarray(np.random.default_rng(0).integers(2, 8000, (batch, 6)).astype(np.int32))
  outs = {}
  for name, (dec, step) in decs.items():
    use(step)  # the jit traces on the first call of each shape
    outs[name] = np.asarray(dec(prompts, key))
  use(NEW)
  times = {name: [] for name in decs}
  for _ in range(reps):
    for name, (dec, _) in decs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(dec(prompts, key))
      times[name].append(time.perf_counter() - t0)
  m = {name: float(np.median(v)) for name, v in times.items()}
  same = all((outs[a + '_before'] == outs[a + '_after']).all() for a in ('ar', 'k4'))
  print(f'B={batch} rounds={reps} same_tokens={same} '
        + ' '.join(f'{name}={v * 1e3:.1f}ms' for name, v in m.items())
        + f' | k4 after/before {m["k4_after"] / m["k4_before"]:.3f}'
        f' | AR after/before {m["ar_after"] / m["ar_before"]:.3f}'
        f' | k4/AR speed-up before {m["ar_before"] / m["k4_before"]:.2f}'
        f' after {m["ar_after"] / m["k4_after"]:.2f}', flush=True)
