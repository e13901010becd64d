"""Fit speed_model on this CPU's measured decode steps, validate it on held-out shapes and batch
sizes, and predict the paper configs' k-token speed-ups on TPU v5e / v5p and H100.

  python -m kforcing_jax.benchmarks.speed_model_fit --config=configs/shakespeare_tiny.py \
      --measured=results/speed_table/speed_table.json \
      --output=results/speed_table/speed_model.json

The table (benchmarks/speed_table) has calibration shapes and two held-out shapes: the demo
model (weights in the CPU's caches) and the large one (weights streamed from memory). Two
splits of its AR and k-token step times: by shape (fit on the calibration shapes at every
batch size; the held-out shapes are never seen) and by batch (fit on the calibration shapes
at batches 1, 16, 256 only; every other point held out). Error per batch: the predicted
speed-up (AR steps * t_AR / (k steps * t_k)) against the measured one; the check is the
held-out shapes' worst error in the by-shape split, against 25%. Leaving each calibration
shape out of the fit in turn gives a second error, one that never looks at the held-out
shapes. The paper predictions use the by-shape fit.

Device figures for the predictions (dense bf16 peak, HBM bandwidth, HBM size), from the
vendors' published specifications: TPU v5e 197 TFLOP/s, 819 GB/s, 16 GiB and TPU v5p
459 TFLOP/s, 2765 GB/s, 95 GiB (Google Cloud TPU documentation, "TPU v5e" / "TPU v5p" system
architecture pages); H100 SXM 989 TFLOP/s (dense), 3.35 TB/s, 80 GB (NVIDIA H100 datasheet).
The prediction ASSUMES those devices reach the same fractions of their peaks as this CPU did
and have no fixed per-step overhead: a model, not a measurement.
"""

import importlib
import math
import os

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
TARGET_ERROR = 0.25  # the check: predicted speed-up within 25% of the measured one


def _config_with_model(config, model: dict):
  c = config.copy_and_resolve_references()
  for key, value in model.items():
    c.model[key] = value
  return c


def _points(config, entry: dict, k: int) -> list[dict]:
  """Every AR and k-token step time in one speed-table entry, with its analytic cost."""
  cfg = _config_with_model(config, entry['model'])
  gen_len = entry['gen_len']
  out = []
  for name, model, kk in (('ar', models.teacher(cfg), 1),
                          (f'pflm_k{k}', models.student(cfg, k), k)):
    for row in entry['throughput'][name]:
      out.append({'decoder': name, 'batch': row['batch'],
                  'seconds': row['seconds'] / row['decode_steps'],
                  'cost': roofline.analytic_step_cost(model, kk, row['batch'], gen_len)})
  return out


def _speedup_errors(model: dict, points: list[dict], entry: dict, k: int, trained) -> list:
  prefix, gen_len = entry['prefix_len'], entry['gen_len']
  steps_ar, steps_k = decode_steps(prefix, gen_len, 1), decode_steps(prefix, gen_len, k)
  by = {(p['decoder'], p['batch']): p for p in points}
  rows = []
  for batch in sorted({p['batch'] for p in points}):
    ar, st = by[('ar', batch)], by[(f'pflm_k{k}', batch)]
    t_ar, t_k = speed_model.predict(model, ar['cost']), speed_model.predict(model, st['cost'])
    measured = steps_ar * ar['seconds'] / (steps_k * st['seconds'])
    predicted = steps_ar * t_ar / (steps_k * t_k)
    rows.append({'batch': batch, 'measured_speedup': measured, 'predicted_speedup': predicted,
                 'speedup_error': predicted / measured - 1,
                 'ar_step_error': t_ar / ar['seconds'] - 1,
                 'k_step_error': t_k / st['seconds'] - 1, 'held_out': not trained(batch)})
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
        t_ar = speed_model.predict(model, roofline.analytic_step_cost(ar_model, 1, b, gen_len))
        t_k = speed_model.predict(model, roofline.analytic_step_cost(k_model, k, b, gen_len))
        curve.append({'batch': b, 'predicted_speedup': steps_ar * t_ar / (steps_k * t_k),
                      'kv_cache_fits_hbm': b in fits})
      out[name][device] = {'largest_batch_fitting_hbm': max(fits) if fits else None,
                           'curve': curve}
  return out


def weight_bandwidth_table(lo: int = 1 << 20, hi: int = 1 << 28) -> list[list[float]]:
  """[(bytes, bytes/s)] of reading buffers from `lo` to `hi` bytes, doubling: this device's
  read bandwidth by working-set size (the caches, then main memory)."""
  sizes = [lo << i for i in range(int(math.log2(hi // lo)) + 1)]
  return [[float(n), roofline.measure_read_bandwidth(n)] for n in sizes]


def run(config, measured_path: str, output: str) -> dict:
  measured = progress.read_json(measured_path)
  k = measured['k']
  entries = measured['configs']
  roles = {name: entry.get('role') for name, entry in entries.items()}
  if 'calibration' not in roles.values() or 'held_out' not in roles.values():
    raise ValueError(f'{measured_path}: needs calibration and held-out shapes (entries with '
                     "'role'); make it with benchmarks.speed_table --calibration_shapes=...")
  points = {name: _points(config, entry, k) for name, entry in entries.items()}
  peak = roofline.measure_peak_flops(config.model.dtype)['flops_per_s']
  bw = roofline.measure_bandwidth()['bytes_per_s']
  weight_bw = weight_bandwidth_table()
  for size, rate in weight_bw:
    progress.log(f'[speed_model] read bandwidth of a {size / 2**20:.0f} MiB buffer: '
                 f'{rate / 1e9:.1f} GB/s')

  def split(trained):
    """Fit on the points with trained(shape name, batch); errors at every point."""
    train = [p for name, pts in points.items() for p in pts if trained(name, p['batch'])]
    fitted = speed_model.fit([p['cost'] for p in train], [p['seconds'] for p in train],
                             weight_bw)
    return {'fit': fitted, 'efficiencies': speed_model.efficiencies(fitted, peak, bw),
            'trained_points': len(train),
            'errors': {name: _speedup_errors(fitted, pts, entries[name], k,
                                             lambda b, n=name: trained(n, b))
                       for name, pts in points.items()}}

  calibration = sorted(n for n, r in roles.items() if r == 'calibration')
  held_out = sorted(n for n, r in roles.items() if r == 'held_out')
  # A: the calibration shapes at every batch train; the held-out shapes (the demo model, in
  # the caches, and the large one, streamed) are never seen
  by_shape = split(lambda name, batch: name in calibration)
  # B: as A but only at batches 1, 16, 256; every other batch size is held out as well
  kept = {1, 16, 256}
  by_batch = split(lambda name, batch: name in calibration and batch in kept)
  worst = max(abs(row['speedup_error']) for name in held_out
              for row in by_shape['errors'][name])
  # C: each calibration shape left out of a fit on the others in turn - how well the model
  # carries to a shape it has not seen, measured without looking at the held-out shapes
  left_out = {name: split(lambda n, b, out=name: n in calibration and n != out)['errors'][name]
              for name in calibration}
  loo = [abs(row['speedup_error']) for rows in left_out.values() for row in rows]
  result = {'measured': measured_path, 'k': k, 'cpu_peak_flops_per_s': peak,
            'cpu_bandwidth_bytes_per_s': bw, 'cpu_weight_bandwidth': weight_bw,
            'calibration_shapes': calibration, 'held_out_shapes': held_out,
            'split_by_shape': dict(by_shape, trained_on=f'{calibration}, all batches',
                                   held_out=f'{held_out}, all batches'),
            'split_by_batch': dict(by_batch, trained_on=f'{calibration} at batches '
                                   f'{sorted(kept)}', held_out='every other point'),
            'leave_one_calibration_shape_out': {
                'worst_speedup_error': max(loo), 'mean_abs_speedup_error': float(np.mean(loo)),
                'errors': left_out},
            'held_out_worst_speedup_error': worst, 'target_error': TARGET_ERROR,
            'passes_check': worst <= TARGET_ERROR,
            'devices': {d: {'peak_flops_per_s': p, 'bandwidth_bytes_per_s': b, 'hbm_bytes': h}
                        for d, (p, b, h) in DEVICES.items()},
            'paper_predictions_from': 'split_by_shape',
            'paper_predictions': _paper_predictions(by_shape['efficiencies'], k)}
  for split_name in ('split_by_shape', 'split_by_batch'):
    for name, rows in result[split_name]['errors'].items():
      for row in rows:
        progress.log(f'[speed_model] {split_name} {name} B={row["batch"]}'
                     f'{" (held out)" if row["held_out"] else ""}: measured '
                     f'{row["measured_speedup"]:.2f}x predicted {row["predicted_speedup"]:.2f}x '
                     f'({100 * row["speedup_error"]:+.0f}%)')
    progress.log(f'[speed_model] {split_name} fit: {result[split_name]["efficiencies"]}')
  progress.log(f'[speed_model] each calibration shape left out in turn: worst speed-up error '
               f'{100 * max(loo):.0f}%, mean {100 * np.mean(loo):.0f}%')
  progress.log(f'[speed_model] held-out shapes {held_out}: worst speed-up error '
               f'{100 * worst:.0f}% (check: within {100 * TARGET_ERROR:.0f}%: '
               f'{"passed" if result["passes_check"] else "FAILED"})')
  if progress.is_main_process():
    progress.write_json(output, result)
    with open(os.path.splitext(output)[0] + '.md', 'w') as f:
      f.write(markdown(result))
  progress.log(f'-> {output}')
  return result


def markdown(result: dict) -> str:
  """The fit's check and its TPU / GPU predictions as Markdown tables (beside the JSON)."""
  fit = result['split_by_shape']
  eff = fit['efficiencies']
  fraction = lambda key: '-' if eff[key] is None else f'{eff[key]:.2f}'  # noqa: E731
  lines = ['# Calibrated decode-step speed model (benchmarks/speed_model_fit.py)', '',
           f'Fitted on {", ".join(result["calibration_shapes"])} (all batch sizes) from '
           f'{result["measured"]}; k = {result["k"]}. Achieved fractions: weight matmuls '
           f'{fraction("matmul_fraction_of_peak")} and attention '
           f'{fraction("attention_fraction_of_peak")} of the measured peak '
           f'({result["cpu_peak_flops_per_s"] / 1e9:.0f} GFLOP/s), weights '
           f'{fraction("weights_fraction_of_bandwidth")} of the one-row-matmul read bandwidth '
           'at their size, activations '
           f'{fraction("activations_fraction_of_bandwidth")} of the large-buffer bandwidth '
           f'({result["cpu_bandwidth_bytes_per_s"] / 1e9:.0f} GB/s), '
           f'{1e6 * eff["overhead_s"]:.0f} us per step.', '',
           '## Check on shapes the fit never saw', '',
           '| shape | batch | measured k-token speed-up | predicted | error |',
           '|---|---|---|---|---|']
  for name in result['held_out_shapes']:
    for row in fit['errors'][name]:
      lines.append(f'| {name} | {row["batch"]} | {row["measured_speedup"]:.2f}x | '
                   f'{row["predicted_speedup"]:.2f}x | {100 * row["speedup_error"]:+.0f}% |')
  loo = result['leave_one_calibration_shape_out']
  verdict = 'passed' if result['passes_check'] else 'FAILED'
  lines += ['', f'Worst held-out error {100 * result["held_out_worst_speedup_error"]:.0f}% '
            f'(check: within {100 * result["target_error"]:.0f}%: {verdict}). Each calibration '
            f'shape left out of the fit in turn: worst {100 * loo["worst_speedup_error"]:.0f}%, '
            f'mean {100 * loo["mean_abs_speedup_error"]:.0f}%.', '',
            '## PREDICTED k-token speed-up on accelerators (a model, not a measurement)', '',
            'The same fractions at each device\'s published peak and HBM bandwidth, weights '
            'streamed from HBM, no per-step overhead.', '',
            '| config on device | ' + ' | '.join(f'B={b}' for b in BATCHES)
            + ' | largest batch whose KV cache fits |',
            '|---|' + '---|' * (len(BATCHES) + 1)]
  for config, devices in result['paper_predictions'].items():
    for device, pred in devices.items():
      curve = {row['batch']: row['predicted_speedup'] for row in pred['curve']}
      lines.append(f'| {config} on {device} | '
                   + ' | '.join(f'{curve[b]:.2f}x' for b in BATCHES)
                   + f' | {pred["largest_batch_fitting_hbm"]} |')
  return '\n'.join(lines) + '\n'


if __name__ == '__main__':
  cli.main(lambda config, workdir: run(config, _MEASURED.value, _OUTPUT.value))
