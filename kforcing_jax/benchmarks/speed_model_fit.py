"""Fit speed_model on this CPU's measured decode steps, validate it on held-out shapes and batch
sizes, and predict the paper configs' k-token speed-ups on TPU v5e / v5p and H100.

  python -m kforcing_jax.benchmarks.speed_model_fit --config=configs/shakespeare_tiny.py \
      --measured=results/speed_table/speed_table.json \
      --output=results/speed_table/speed_model.json

Two splits of the table's AR and k-token step times: by shape (fit on the demo model, held
out: the bandwidth-bound 'large' model, a shape the fit never saw) and by batch (fit on both
models at every other batch size, held out: the batch sizes in between). Error per batch: the
predicted speed-up (AR steps * t_AR / (k steps * t_k)) against the measured one. The paper
predictions use the by-batch fit, the one that saw a bandwidth-bound model.

Device figures for the predictions (dense bf16 peak, HBM bandwidth, HBM size), from the
vendors' published specifications: TPU v5e 197 TFLOP/s, 819 GB/s, 16 GiB and TPU v5p
459 TFLOP/s, 2765 GB/s, 95 GiB (Google Cloud TPU documentation, "TPU v5e" / "TPU v5p" system
architecture pages); H100 SXM 989 TFLOP/s (dense), 3.35 TB/s, 80 GB (NVIDIA H100 datasheet).
The prediction ASSUMES those devices reach the same fractions of their peaks as this CPU did
and have no fixed per-step overhead: a model, not a measurement.
"""

import importlib
import math

import jax
import numpy as np
from absl import flags

from kforcing_jax import cli, models, progress, roofline, speed_model
from kforcing_jax.timing import decode_steps

_MEASURED = flags.DEFINE_string('measured', 'results/speed_table/speed_table.json',
                                'speed_table JSON to fit and validate on.')
_OUTPUT = flags.DEFINE_string('output', 'results/speed_table/speed_model.json', 'Result JSON.')

DEVICES = {  # name: (peak bf16 FLOP/s, HBM bytes/s, HBM bytes); sources in the module doc
    'tpu_v5e': (197e12, 819e9, 16 << 30),
    'tpu_v5p': (459e12, 2765e9, 95 << 30),
    'h100_sxm': (989e12, 3.35e12, 80e9),
}
PAPER_CONFIGS = ('lm1b_ar', 'owt_ar')
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _config_with_model(config, model: dict):
  c = config.copy_and_resolve_references()
  for key, value in model.items():
    c.model[key] = value
  return c


def _points(config, entry: dict, k: int):
  """(flops, bytes, seconds per step, kind, batch) of every AR and k-token step in the table."""
  cfg = _config_with_model(config, entry['model'])
  ar_model, k_model = models.teacher(cfg), models.student(cfg, k)
  gen_len = entry['gen_len']
  out = []
  for name, model, kk in (('ar', ar_model, 1), (f'pflm_k{k}', k_model, k)):
    for row in entry['throughput'][name]:
      cost = roofline.analytic_step_cost(model, kk, row['batch'], gen_len)
      out.append((cost['flops'], cost['bytes'], row['seconds'] / row['decode_steps'],
                  name, row['batch']))
  return out


def _speedup_errors(model, points, entry, k):
  prefix, gen_len = entry['prefix_len'], entry['gen_len']
  steps_ar, steps_k = decode_steps(prefix, gen_len, 1), decode_steps(prefix, gen_len, k)
  by = {(p[3], p[4]): p for p in points}
  rows = []
  for batch in sorted({p[4] for p in points}):
    ar, st = by[('ar', batch)], by[(f'pflm_k{k}', batch)]
    t_ar, t_k = (float(speed_model.predict(model, p[0], p[1])) for p in (ar, st))
    measured = steps_ar * ar[2] / (steps_k * st[2])
    predicted = steps_ar * t_ar / (steps_k * t_k)
    rows.append({'batch': batch, 'measured_speedup': measured, 'predicted_speedup': predicted,
                 'speedup_error': predicted / measured - 1,
                 'ar_step_error': t_ar / ar[2] - 1, 'k_step_error': t_k / st[2] - 1})
  return rows


def _paper_predictions(eff: dict, k: int) -> dict:
  out = {}
  for name in PAPER_CONFIGS:
    cfg = importlib.import_module(f'configs.{name}').get_config()
    ar_model, k_model = models.teacher(cfg), models.student(cfg, k)
    gen_len, prefix = cfg.decode.gen_len, cfg.decode.prefix_len
    steps_ar, steps_k = decode_steps(prefix, gen_len, 1), decode_steps(prefix, gen_len, k)
    mc = ar_model.cfg
    act = np.dtype(mc.compute_dtype).itemsize
    weights = 4 * sum(math.prod(x.shape) for x in jax.tree.leaves(k_model.param_shapes))
    cache_per_row = mc.num_layers * 2 * mc.d_model * (gen_len + k) * act
    out[name] = {}
    for device, (peak, bw, hbm) in DEVICES.items():
      model = speed_model.for_device(eff, peak, bw, overhead_s=0.0)
      fits = [b for b in BATCHES if weights + b * cache_per_row <= hbm]
      curve = []
      for b in BATCHES:
        t_ar = float(speed_model.predict(model, **_cost(ar_model, 1, b, gen_len)))
        t_k = float(speed_model.predict(model, **_cost(k_model, k, b, gen_len)))
        curve.append({'batch': b, 'predicted_speedup': steps_ar * t_ar / (steps_k * t_k),
                      'kv_cache_fits_hbm': b in fits})
      out[name][device] = {'largest_batch_fitting_hbm': max(fits) if fits else None,
                           'curve': curve}
  return out


def _cost(model, k, batch, gen_len):
  c = roofline.analytic_step_cost(model, k, batch, gen_len)
  return {'flops': c['flops'], 'nbytes': c['bytes']}


def run(config, measured_path: str, output: str) -> dict:
  measured = progress.read_json(measured_path)
  k = measured['k']
  entries = measured['configs']
  points = {name: _points(config, entries[name], k) for name in ('demo', 'large')}
  peak = roofline.measure_peak_flops(config.model.dtype)['flops_per_s']
  bw = roofline.measure_bandwidth()['bytes_per_s']

  def split(train_of):
    """Fit on the points train_of(config name, point) keeps; errors on every point."""
    train = [p for name, pts in points.items() for p in pts if train_of(name, p)]
    fitted = speed_model.fit(*zip(*[p[:3] for p in train]))
    return {'fit': fitted, 'efficiencies': speed_model.efficiencies(fitted, peak, bw),
            'errors': {name: [dict(row, held_out=not train_of(name, (0, 0, 0, '', row['batch'])))
                              for row in _speedup_errors(fitted, pts, entries[name], k)]
                       for name, pts in points.items()}}

  # A: one shape trains, the other (bandwidth-bound, never seen) is held out
  by_shape = split(lambda name, p: name == 'demo')
  # B: both shapes at every other batch size train; the batch sizes in between are held out
  batches = sorted({p[4] for pts in points.values() for p in pts})
  kept = set(batches[::2])
  by_batch = split(lambda name, p: p[4] in kept)
  result = {'measured': measured_path, 'k': k, 'cpu_peak_flops_per_s': peak,
            'cpu_bandwidth_bytes_per_s': bw,
            'split_by_shape': dict(by_shape, trained_on='demo model, all batches',
                                   held_out='large model, all batches'),
            'split_by_batch': dict(by_batch, trained_on=f'both models at batches {sorted(kept)}',
                                   held_out='both models at the other batches'),
            'devices': {d: {'peak_flops_per_s': p, 'bandwidth_bytes_per_s': b, 'hbm_bytes': h}
                        for d, (p, b, h) in DEVICES.items()},
            'paper_predictions_from': 'split_by_batch',
            'paper_predictions': _paper_predictions(by_batch['efficiencies'], k)}
  for split_name in ('split_by_shape', 'split_by_batch'):
    for name, rows in result[split_name]['errors'].items():
      for row in rows:
        progress.log(f'[speed_model] {split_name} {name} B={row["batch"]}'
                     f'{" (held out)" if row["held_out"] else ""}: measured '
                     f'{row["measured_speedup"]:.2f}x predicted {row["predicted_speedup"]:.2f}x '
                     f'({100 * row["speedup_error"]:+.0f}%)')
    progress.log(f'[speed_model] {split_name} fit: {result[split_name]["efficiencies"]}')
  if progress.is_main_process():
    progress.write_json(output, result)
  progress.log(f'-> {output}')
  return result


if __name__ == '__main__':
  cli.main(lambda config, workdir: run(config, _MEASURED.value, _OUTPUT.value))
