"""The decode speed table: tokens/s, step-time ratio and forwards per token of the AR teacher
and a k-token student, for the config's own model and a larger, weight-bandwidth-bound one.

  python -m kforcing_jax.benchmarks.speed_table --config=configs/shakespeare_tiny.py \
      --output=results/speed_table/speed_table.json

Random weights (decode cost does not depend on their values: fixed length, no EOS stop),
timed by timing.measure_throughput: compile + warm-up, then --repeats interleaved rounds of
AR and k = --k in one process, medians. The step-time ratio is (k-step seconds / k steps) /
(AR seconds / AR steps) from those medians: a k-token student beats AR while it is below k.

'large' scales the config's model to --large_d_model / --large_layers (8 x 512 by default:
117 MB of float32 weights, far past this CPU's caches, so a small-batch step streams its
weights from memory - the regime of the paper's GPUs) and times it at --large_batch_sizes only
(its batch-256 run would take most of an hour here).

--calibration_shapes adds the shapes speed_model_fit calibrates on ('DxL[xH]:B/B/..', d_model
x layers [x heads, default d_model / 64] at those batch sizes). They bracket the two shapes
above in weight bytes (2.5 MB, in L2, to 139 MB, far past L3) and in head width (32 and 64)
without being either, so the fit's check on 'demo' and 'large' is a check on shapes it never
saw.
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
_CALIBRATION = flags.DEFINE_list(
    'calibration_shapes',
    ['64x2:1/4/16/64/256', '96x4x3:1/4/16/64/256', '128x2x2:1/4/16/64/256',
     '160x4x5:1/4/16/64/256', '192x6:1/4/16/64/256', '256x8:1/4/16/64', '384x6:1/4/16/64',
     '640x6:1/4/16'],
    "Shapes timed for speed_model_fit's calibration, 'DxL[xH]:B/B/..' (heads default to "
    "d_model / 64; empty: none).")


def parse_shapes(specs: list[str]) -> list[tuple[int, int, int, list[int]]]:
  """'DxL[xH]:B/B/..' -> (d_model, layers, heads, batch sizes); heads default to d_model / 64;
  a clear error for anything else."""
  out = []
  for spec in specs:
    try:
      shape, batches = spec.split(':')
      dims = [int(x) for x in shape.lower().split('x')]
      if len(dims) not in (2, 3):
        raise ValueError
      d, layers = dims[:2]
      heads = dims[2] if len(dims) == 3 else max(1, d // 64)
      sizes = [int(b) for b in batches.split('/')]
    except ValueError:
      raise ValueError(f"calibration shape {spec!r}: expected 'DxL[xH]:B/B/..', e.g. "
                       "'192x6:1/4/16' or '96x4x3:1/16'.") from None
    if min(d, layers, heads) < 1 or d % heads or not sizes or min(sizes) < 1:
      raise ValueError(f'calibration shape {spec!r}: d_model, layers, heads and batch sizes '
                       'must be >= 1 and heads must divide d_model.')
    out.append((d, layers, heads, sizes))
  return out


def _shaped(config, d: int, layers: int, heads: int, batches: list[int]):
  c = config.copy_and_resolve_references()
  c.model.d_model, c.model.num_layers, c.model.num_heads = d, layers, heads
  c.eval.batch_sizes = tuple(batches)
  return c


def run(config, output: str, k: int, repeats: int, large_d: int, large_layers: int,
        large_batches: list[int], calibration: list[tuple[int, int, int, list[int]]] = ()) -> dict:
  shapes = [('demo', 'held_out', config),
            ('large', 'held_out', _shaped(config, large_d, large_layers, max(1, large_d // 64),
                                          large_batches))]
  shapes += [(f'cal_{d}x{layers}x{heads}', 'calibration', _shaped(config, d, layers, heads, b))
             for d, layers, heads, b in calibration]
  out = {'device': jax.devices()[0].device_kind, 'jax_version': jax.__version__, 'k': k,
         'repeats': repeats, 'configs': {}}
  for name, role, cfg in shapes:
    result = decode_speed.measure(cfg, [k], repeats)
    out['configs'][name] = {'role': role, 'model': result['model'], 'gen_len': result['gen_len'],
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
      config, decode_speed._OUTPUT.value, _K.value, decode_speed._REPEATS.value,
      _LARGE_D.value, _LARGE_LAYERS.value, [int(b) for b in _LARGE_BATCHES.value],
      parse_shapes(_CALIBRATION.value)))
