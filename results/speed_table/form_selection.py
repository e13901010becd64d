"""Which additive form of the speed model? Leave-one-calibration-shape-out on the speed table.

  PYTHONPATH=. .venv/bin/python results/speed_table/form_selection.py \
      > results/speed_table/form_selection.txt

Every form is linear in its non-negative coefficients, fitted as speed_model.fit does (NNLS on
relative error: speed_model.fit_columns), on the analytic costs of
roofline.analytic_step_cost. For each form: each calibration shape is left out of a fit on the others in turn (the error of its predicted
k-token speed-ups: 'CV'), then one fit on all calibration shapes is checked on the held-out
demo and large shapes. The selection rule is the CV mean, which never looks at the held-out
shapes. F1 is kforcing_jax/speed_model.py. Reads results/speed_table/speed_table.json and the
weight read-bandwidth table of results/speed_table/speed_model.json.
"""

import json

import numpy as np

from configs import shakespeare_tiny
from kforcing_jax import models, roofline, speed_model
from kforcing_jax.timing import decode_steps

TABLE = json.load(open('results/speed_table/speed_table.json'))
FIT = json.load(open('results/speed_table/speed_model.json'))
WEIGHT_BW = FIT['cpu_weight_bandwidth']
LLC_BYTES = 32 << 20  # this machine's L3 (lscpu)

FORMS = {
    'F1 overhead + matmul + attention + weights@bw(size) + activations (speed_model.py)':
        ['one', 'mm', 'att', 'wt', 'act'],
    'F2 F1 + per-layer overhead': ['one', 'layers', 'mm', 'att', 'wt', 'act'],
    'F3 weights in bytes, split at the L3 size': ['one', 'mm', 'att', 'wres', 'wstr', 'act'],
    'F4 F3 + per-layer overhead': ['one', 'layers', 'mm', 'att', 'wres', 'wstr', 'act'],
    'F5 F2 + AR sampler rows x V': ['one', 'layers', 'mm', 'att', 'wt', 'act', 'samp'],
    'F6 F4 + AR sampler rows x V': ['one', 'layers', 'mm', 'att', 'wres', 'wstr', 'act', 'samp'],
    'F7 F1 + AR sampler rows x V': ['one', 'mm', 'att', 'wt', 'act', 'samp'],
}


def features(model, k, batch, gen_len, layers, vocab):
  c = roofline.analytic_step_cost(model, k, batch, gen_len)
  w = c['weight_bytes']
  return {'one': 1.0, 'layers': float(layers), 'mm': c['matmul_flops'],
          'att': c['attention_flops'], 'act': c['activation_bytes'],
          'wt': w / speed_model.weight_bandwidth_at(WEIGHT_BW, w),
          'wres': w if w <= LLC_BYTES else 0.0, 'wstr': w if w > LLC_BYTES else 0.0,
          'samp': float(batch * vocab) if model.kind == 'ar' else 0.0}


def points():
  base = shakespeare_tiny.get_config()
  k = TABLE['k']
  out = []
  for name, entry in TABLE['configs'].items():
    cfg = base.copy_and_resolve_references()
    for key, value in entry['model'].items():
      cfg.model[key] = value
    for kind, model, kk in (('ar', models.teacher(cfg), 1), ('k', models.student(cfg, k), k)):
      for row in entry['throughput']['ar' if kind == 'ar' else f'pflm_k{k}']:
        out.append({'name': name, 'role': entry['role'], 'kind': kind, 'batch': row['batch'],
                    'seconds': row['seconds'] / row['decode_steps'],
                    'x': features(model, kk, row['batch'], entry['gen_len'], cfg.model.num_layers,
                                  cfg.model.vocab_size),
                    'steps': (decode_steps(entry['prefix_len'], entry['gen_len'], 1),
                              decode_steps(entry['prefix_len'], entry['gen_len'], k))})
  return out


def fit(train, cols):
  return speed_model.fit_columns([[p['x'][c] for c in cols] for p in train],
                                 [p['seconds'] for p in train])


def speedup_errors(pts, name, cols, coef):
  predict = lambda p: float(np.dot([p['x'][c] for c in cols], coef))  # noqa: E731
  errors = []
  for batch in sorted({p['batch'] for p in pts if p['name'] == name}):
    ar, st = (next(p for p in pts if p['name'] == name and p['batch'] == batch
                   and p['kind'] == kind) for kind in ('ar', 'k'))
    n_ar, n_k = ar['steps']
    measured = n_ar * ar['seconds'] / (n_k * st['seconds'])
    errors.append((batch, n_ar * predict(ar) / (n_k * predict(st)) / measured - 1))
  return errors


def main():
  pts = points()
  cal = sorted({p['name'] for p in pts if p['role'] == 'calibration'})
  held = sorted({p['name'] for p in pts if p['role'] == 'held_out'})
  print(f'calibration shapes: {cal}; held out: {held}')
  for form, cols in FORMS.items():
    cv = []
    for out in cal:
      coef = fit([p for p in pts if p['name'] in cal and p['name'] != out], cols)
      cv += [abs(e) for _, e in speedup_errors(pts, out, cols, coef)]
    coef = fit([p for p in pts if p['name'] in cal], cols)
    rows = [(n, b, e) for n in held for b, e in speedup_errors(pts, n, cols, coef)]
    print(f'{form}\n  CV mean {100 * np.mean(cv):.1f}%, worst {100 * max(cv):.0f}% | held-out '
          f'worst {100 * max(abs(e) for *_, e in rows):.0f}%: '
          + ', '.join(f'{n} B={b} {100 * e:+.0f}%' for n, b, e in rows))


if __name__ == '__main__':
  main()
