"""Decode speed of AR vs k-token decoding for any model shape, random weights, one process.

  python -m kforcing_jax.benchmarks.decode_speed --config=configs/shakespeare_tiny.py \
      --config.model.d_model=256 --output=runs/bench/decode_speed_d256.json

Decoding cost does not depend on the weights' values (fixed length, no EOS stop), so this
times the shapes of any config - e.g. the 4-layer d=256 reference shape of the evaluation issue
- without training them. Same protocol as `evaluate` (timing.measure_throughput): random
config.decode.prefix_len-token prompts to config.decode.gen_len, warm-up, then --repeats
interleaved rounds (AR, k=1, k=2, k=4), median, speed-up vs AR.
"""

import jax
import numpy as np
from absl import flags

from kforcing_jax import cli, decode, models, progress, rundir, sharding, timing

_OUTPUT = flags.DEFINE_string('output', 'runs/bench/decode_speed.json', 'Result JSON.')
_KS = flags.DEFINE_list('ks', ['1', '2', '4'], 'Student k values to time.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed rounds; the median is reported.')


def random_export(model, layout, seed: int, backbone=None) -> rundir.Export:
  params = jax.jit(model.init, out_shardings=layout.param_shardings(model))(jax.random.key(seed))
  if backbone is not None:
    params['backbone'] = backbone
  return rundir.Export(model, params, {}, '<random>')


def benchmark(config, output: str, ks: list[int], repeats: int) -> dict:
  result = measure(config, ks, repeats)
  if progress.is_main_process():
    progress.write_json(output, result)
  for name, row in result['speedup_vs_ar'].items():
    progress.log(f'{name:>9s} ' + '  '.join(f'B={b}: {s:.2f}x' for b, s in row.items()))
  progress.log(f'-> {output}')
  return result


def measure(config, ks: list[int], repeats: int) -> dict:
  """AR and k-token students of `config`'s shape with random weights, timed at
  config.eval.batch_sizes: the result dict `benchmark` writes."""
  dc, prefix_len, gen_len = config.decode, config.decode.prefix_len, config.decode.gen_len
  layout = sharding.layout_from_config(config)
  ar = random_export(models.teacher(config), layout, 0)
  exports = [ar] + [random_export(models.student(config, k), layout, k, ar.params) for k in ks]
  decoders = [decode.decoder(e, layout, gen_len=gen_len, eos_id=None,
                             penalty=decode.freq_penalty(config, e.k),
                             temperature=dc.temperature) for e in exports]
  prompts = np.random.default_rng(0).integers(2, config.model.vocab_size, (1, prefix_len))
  speed = timing.measure_throughput(decoders, prompts, jax.random.key(0),
                                    [int(b) for b in config.eval.batch_sizes], repeats,
                                    prefix_len, gen_len)
  ar_rate = {row['batch']: row['tokens_per_s'] for row in speed['ar']}
  result = {'device': timing.device_name(), 'jax_version': jax.__version__,
            'model': {k: config.model[k] for k in ('d_model', 'num_layers', 'num_heads',
                                                   'vocab_size', 'dtype')},
            'prefix_len': prefix_len, 'gen_len': gen_len, 'repeats': repeats,
            'speedup_vs_ar': {name: {row['batch']: row['tokens_per_s'] / ar_rate[row['batch']]
                                     for row in rows} for name, rows in speed.items()},
            'throughput': speed}
  return result


if __name__ == '__main__':
  cli.main(lambda config, workdir: benchmark(
      config, _OUTPUT.value, [int(k) for k in _KS.value], _REPEATS.value))
