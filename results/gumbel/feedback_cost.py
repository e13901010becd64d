"""What token feedback costs a k-token decode, side by side on this machine.

The same k_max = 4 student of configs/shakespeare_gumbel.py with and without its feedback block
(model.token_feedback), and the AR teacher, each decoding 128 tokens from 6-token prompts
(k = 2 and 4), compiled as the evaluation compiles them (decode.loop_compiler_options) and
timed in interleaved rounds; median per decoder. Random weights: a step's time does not depend
on their values. Writes feedback_cost.json next to this file.

  PYTHONPATH=. .venv/bin/python results/gumbel/feedback_cost.py [rounds]
"""

import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import shakespeare_gumbel
from kforcing_jax import decode, models

GEN_LEN, PROMPT_LEN, BATCHES = 128, 6, (1, 16, 256)


def compiled(loop, model, params, prompts, options, **static):
  fn = jax.jit(functools.partial(loop, model, gen_len=GEN_LEN, **static))
  exe = fn.lower(params, prompts, jax.random.key(1), 1.0).compile(options)
  return lambda: exe(params, prompts, jax.random.key(1), 1.0).block_until_ready()


def main(rounds: int):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('x',))
  options = decode.loop_compiler_options(mesh)
  config = shakespeare_gumbel.get_config()
  ar = models.teacher(config)
  ar_params = ar.init(jax.random.key(0))
  students = {}
  for feedback in (False, True):
    config.model.token_feedback = feedback
    model = models.student(config, 4)
    students[feedback] = (model, model.init(jax.random.key(0)))
  out = {'rounds': rounds, 'gen_len': GEN_LEN, 'device': str(jax.devices()[0]), 'batches': {}}
  for batch in BATCHES:
    prompts = jnp.ones((batch, PROMPT_LEN), jnp.int32)
    runs = {'ar': compiled(decode.ar_decode_loop, ar, ar_params, prompts, options)}
    for k in (2, 4):
      for feedback, (model, params) in students.items():
        runs[f'k{k}_{"feedback" if feedback else "plain"}'] = compiled(
            decode.pflm_decode_loop, model, params, prompts, options, k=k)
    times = {name: [] for name in runs}
    for run in runs.values():
      run()  # warm-up
    for _ in range(rounds):
      for name, run in runs.items():
        t0 = time.perf_counter()
        run()
        times[name].append(time.perf_counter() - t0)
    median = {name: float(np.median(t)) for name, t in times.items()}
    row = {'seconds': median, 'speedup_vs_ar': {n: median['ar'] / t for n, t in median.items()},
           'feedback_over_plain': {f'k{k}': median[f'k{k}_feedback'] / median[f'k{k}_plain']
                                   for k in (2, 4)}}
    out['batches'][str(batch)] = row
    print(f'batch {batch}: ' + '  '.join(f'{n} {row["speedup_vs_ar"][n]:.2f}x' for n in runs)
          + '  | feedback / plain time: ' + '  '.join(
              f'{k} {v:.2f}' for k, v in row['feedback_over_plain'].items()), flush=True)
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'feedback_cost.json')
  with open(path, 'w') as f:
    json.dump(out, f, indent=1)
  print(f'wrote {path}')


if __name__ == '__main__':
  main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
