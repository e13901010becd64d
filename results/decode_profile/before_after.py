"""One-process before/after of this session's decode changes (random demo-size weights):
'before' = jnp.argmax + one-hot penalty and XLA's default copy insertion (the code at b2748db),
'after' = the current decode.py. AR and k=4 interleaved, medians of --reps rounds.

  PYTHONPATH=. .venv/bin/python results/decode_profile/before_after.py REPS BATCH...
"""
import sys, time
import jax, jax.numpy as jnp, numpy as np
from kforcing_jax import decode, models, sharding
from kforcing_jax.benchmarks.decode_speed import random_export
from configs import shakespeare_tiny


def old_penalty(logits, counts, freq_penalty, active, u=None, readout="argmax", order="id"):
  tokens = []
  for j in range(logits.shape[1]):
    token = jnp.argmax(logits[:, j] - freq_penalty * counts, axis=-1).astype(jnp.int32)
    counts = counts + jax.nn.one_hot(token, counts.shape[-1], dtype=counts.dtype) * active[:, j, None]
    tokens.append(token)
  return jnp.stack(tokens, axis=1), counts


NEW = (decode.penalized_readout, decode.loop_compiler_options)
OLD = (old_penalty, lambda mesh: None)


def use(version):
  decode.penalized_readout, decode.loop_compiler_options = version


config = shakespeare_tiny.get_config()
layout = sharding.layout_from_config(config)
ar = random_export(models.teacher(config), layout, 0)
st = random_export(models.student(config, 4), layout, 4, ar.params)
decs = {}
for tag, version in (('before', OLD), ('after', NEW)):
  use(version)
  decs['ar_' + tag] = (decode.decoder(ar, layout, gen_len=128, eos_id=None, temperature=1.0), version)
  decs['k4_' + tag] = (decode.decoder(st, layout, gen_len=128, eos_id=None, penalty=0.5), version)
key = jax.random.key(0)
reps = int(sys.argv[1])
for B in [int(b) for b in sys.argv[2:]]:
  prompts = jnp.asarray(np.random.default_rng(0).integers(2, 8000, (B, 6)).astype(np.int32))
  outs = {}
  for n, (d, version) in decs.items():
    use(version)  # the jit traces (and picks its options) on the first call of each shape
    outs[n] = np.asarray(d(prompts, key))
  use(NEW)
  t = {n: [] for n in decs}
  for r in range(reps):
    for n, (d, _) in decs.items():
      t0 = time.perf_counter(); jax.block_until_ready(d(prompts, key)); t[n].append(time.perf_counter() - t0)
  m = {n: float(np.median(v)) for n, v in t.items()}
  same = all((outs[a + '_before'] == outs[a + '_after']).all() for a in ('ar', 'k4'))
  ratio = lambda tag: (m['k4_' + tag] / 31) / (m['ar_' + tag] / 122)
  print(f'B={B} same_tokens={same} ' + ' '.join(f'{n}={v * 1e3:.1f}ms' for n, v in m.items())
        + f' | k4/AR speed-up before {m["ar_before"] / m["k4_before"]:.2f} after '
        f'{m["ar_after"] / m["k4_after"]:.2f} | step ratio before {ratio("before"):.2f} after '
        f'{ratio("after"):.2f} | AR after/before {m["ar_after"] / m["ar_before"]:.2f}', flush=True)
