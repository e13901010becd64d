"""The decode speed table: tokens/s, step-time ratio and forwards per token of the AR teacher
and a k-token student, for the config's own model and a larger, weight-bandwidth-bound one.

  python -m kforcing_jax.benchmarks.speed_table --config=configs/shakespeare_tiny.py \
      --output=results/speed_table/speed_table.json

Random weights (decode cost does not depend on their values: fixed length, no EOS stop),
timed by timing.measure_throughput: compile + warm-up, then --repeats interleaved rounds of
AR and k = --k in one process, medians. The step-time ratio is (k-step seconds / k steps) /
(AR seconds / AR steps) from those medians: a k-token student beats AR while it is below k.

'large' scales the config's model to --large_d_model / --large_layers (8 x 512 by default:
~105 MB of float32 weights, far past this CPU's caches, so a small-batch step streams its
weights from memory - the regime of the paper's GPUs) and times it at --large_batch_sizes only
(its batch-256 run would take most of an hour here).
"""

import jax
from absl import flags

from kforcing_jax import cli, progress, timing
from kforcing_jax.benchmarks import decode_speed

# --output and --repeats are decode_speed's flags (one definition per process)
_K = flags.DEFINE_integer('k', 4, 'Tokens per student step.')
_LARGE_D = flags.DEFINE_integer('large_d_model', 512, 'd_model of the bandwidth-bound model.')
_LARGE_LAYERS = flags.DEFINE_integer('large_layers', 8, 'Layers of the bandwidth-bound model.')
_LARGE_BATCHES = flags.DEFINE_list('large_batch_sizes', ['1', '4', '16'],
                                   'Batch sizes timed for the bandwidth-bound model.')


def run(config, output: str, k: int, repeats: int, large_d: int, large_layers: int,
        large_batches: list[int]) -> dict:
  large = config.copy_and_resolve_references()
  large.model.d_model, large.model.num_layers = large_d, large_layers
  large.model.num_heads = max(1, large_d // 64)
  large.eval.batch_sizes = tuple(large_batches)
  out = {'device': jax.devices()[0].device_kind, 'jax_version': jax.__version__, 'k': k,
         'repeats': repeats, 'configs': {}}
  for name, cfg in (('demo', config), ('large', large)):
    result = decode_speed.measure(cfg, [k], repeats)
    out['configs'][name] = {'model': result['model'], 'gen_len': result['gen_len'],
                            'prefix_len': result['prefix_len'],
                            'table': timing.speed_table_rows(result, f'pflm_k{k}'),
                            'throughput': result['throughput']}
    for row in out['configs'][name]['table']:
      progress.log(f'[speed_table] {name} B={row["batch"]}: AR {row["ar_tokens_per_s"]:.0f} '
                   f'k={k} {row["k_tokens_per_s"]:.0f} tok/s, speed-up '
                   f'{row["speedup_vs_ar"]:.2f}x, step ratio {row["step_time_ratio_vs_ar"]:.2f}')
  if progress.is_main_process():
    progress.write_json(output, out)
  progress.log(f'-> {output}')
  return out


if __name__ == '__main__':
  flags.FLAGS.set_default('output', 'results/speed_table/speed_table.json')
  cli.main(lambda config, workdir: run(
      config, decode_speed._OUTPUT.value, _K.value, decode_speed._REPEATS.value, _LARGE_D.value, _LARGE_LAYERS.value,
      [int(b) for b in _LARGE_BATCHES.value]))
