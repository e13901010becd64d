# one process: decoders with (new) and without (old) the CPU compiler option, AR and k=4 interleaved
import sys, time
import jax, jax.numpy as jnp, numpy as np
from kforcing_jax import decode, models, sharding
from kforcing_jax.benchmarks.decode_speed import random_export
from configs import shakespeare_tiny
config = shakespeare_tiny.get_config()
layout = sharding.layout_from_config(config)
ar = random_export(models.teacher(config), layout, 0)
st = random_export(models.student(config, 4), layout, 4, ar.params)
opt = decode.loop_compiler_options
decs = {}
for tag, o in (('old', lambda mesh: None), ('new', opt)):
  decode.loop_compiler_options = o
  decs['ar_' + tag] = decode.decoder(ar, layout, gen_len=128, eos_id=None, temperature=1.0)
  decs['k4_' + tag] = decode.decoder(st, layout, gen_len=128, eos_id=None, penalty=0.5)
decode.loop_compiler_options = opt
key = jax.random.key(0)
reps = int(sys.argv[1])
for B in [int(b) for b in sys.argv[2:]]:
  prompts = jnp.asarray(np.random.default_rng(0).integers(2, 8000, (B, 6)).astype(np.int32))
  outs = {}
  for n, d in decs.items():
    decode.loop_compiler_options = (lambda mesh: None) if n.endswith('old') else opt
    outs[n] = np.asarray(d(prompts, key))
  t = {n: [] for n in decs}
  for r in range(reps):
    for n, d in decs.items():
      t0 = time.perf_counter(); jax.block_until_ready(d(prompts, key)); t[n].append(time.perf_counter() - t0)
  m = {n: np.median(v) for n, v in t.items()}
  same = all((outs[a + '_old'] == outs[a + '_new']).all() for a in ('ar', 'k4'))
  print(f'B={B} same {same} ' + ' '.join(f'{n} {v*1e3:.1f}ms' for n, v in m.items()) +
        ' | speedup old %.2f new %.2f | AR new/old %.2f k4 new/old %.2f' % (m['ar_old']/m['k4_old'], m['ar_new']/m['k4_new'], m['ar_new']/m['ar_old'], m['k4_new']/m['k4_old']), flush=True)
