"""Decode speed of AR vs k-token decoding for any model shape, random weights, one process.

  python -m kforcing_jax.benchmarks.decode_speed --config=configs/shakespeare_tiny.py \
      --config.model.d_model=256 --output=runs/bench/decode_speed_d256.json

Decoding cost does not depend on the weights' values (fixed length, no EOS stop), so this
times the shapes of any config - e.g. the 4-layer d=256 reference shape of the evaluation issue
- without training them. Same protocol as `evaluate`: 6-token prompts to config.decode.gen_len,
warm-up, then --repeats interleaved rounds (AR, k=1, k=2, k=4), median, speed-up vs AR.
"""

import json
import os

import jax
import numpy as np
from absl import flags

from kforcing_jax import cli, distill, distributed, evaluate, progress, sharding, train
from kforcing_jax import train_state

_OUTPUT = flags.DEFINE_string('output', 'runs/bench/decode_speed.json', 'Result JSON.')
_KS = flags.DEFINE_list('ks', ['1', '2', '4'], 'Student k values to time.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed rounds; the median is reported.')


def main(argv):
  del argv
  cli.quiet_libraries()
  distributed.initialize()
  config = cli.CONFIG.value
  dc, prefix_len, gen_len = config.decode, config.decode.prefix_len, config.decode.gen_len
  mesh = sharding.mesh_from_config(config)
  rules = tuple(tuple(r) for r in config.sharding_rules)
  ar = train.teacher_model(config)
  ar_params = jax.jit(ar.init, out_shardings=train_state.param_shardings(ar, mesh, rules))(
      jax.random.key(0))
  cands = [evaluate.Candidate('ar', 0, 1, ar, ar_params, {}, None)]
  cands[0].decode = evaluate._ar_decoder(ar, ar_params, dc.temperature, gen_len, mesh, rules)
  for k in (int(k) for k in _KS.value):
    model = distill.student_model(config, k)
    params = jax.jit(model.init, out_shardings=train_state.param_shardings(model, mesh, rules))(
        jax.random.key(k))
    params['backbone'] = ar_params
    penalty = float(dc.freq_penalty.get(str(k), 0.0))
    cand = evaluate.Candidate(f'pflm_k{k}', k, k, model, params, {'freq_penalty': penalty},
                              None)
    cand.decode = evaluate._pflm_decoder(model, params, k, penalty, gen_len, mesh, rules)
    cands.append(cand)
  prompts = np.random.default_rng(0).integers(2, config.model.vocab_size, (1, prefix_len))
  speed = evaluate.measure_throughput(
      cands, prompts, jax.random.key(0), [int(b) for b in config.eval.batch_sizes],
      _REPEATS.value, prefix_len, gen_len, lambda msg: print(f'[decode_speed] {msg}', flush=True))
  ar_rate = {row['batch']: row['tokens_per_s'] for row in speed['ar']}
  result = {'device': evaluate._device_name(), 'jax_version': jax.__version__,
            'model': {k: config.model[k] for k in ('d_model', 'num_layers', 'num_heads',
                                                   'vocab_size', 'dtype')},
            'prefix_len': prefix_len, 'gen_len': gen_len, 'repeats': _REPEATS.value,
            'speedup_vs_ar': {c.name: {row['batch']: row['tokens_per_s'] / ar_rate[row['batch']]
                                       for row in speed[c.name]} for c in cands},
            'throughput': speed}
  if progress.is_main_process():
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    with open(_OUTPUT.value, 'w') as f:
      json.dump(result, f, indent=2)
    for name, row in result['speedup_vs_ar'].items():
      print(f'{name:>9s} ' + '  '.join(f'B={b}: {s:.2f}x' for b, s in row.items()))
    print(f'-> {_OUTPUT.value}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  cli.run(main)
