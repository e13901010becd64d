"""The model-size sweep (`make sizes`): the whole pipeline (teacher, distillation k = 1 -> 2 -> 4,
evaluation) at several model sizes of one config, and how agreement, quality loss and speed-up
change with size.

The config's `sizes` block (configs/sizes.py) lists the sizes by name, each a few `model` fields
to override; every size keeps the rest of the config (corpus, tokenizer, recipe, evaluation) and
runs in its own run directory, rundir.size_workdir(workdir, name). One independent evaluator, the
run's own (rundir.evaluator_workdir), scores every size, so gen. ppl is comparable across them.

From each size's report/results.json this module builds one row per size (`size_row`): parameters
(all, and outside the embedding and output head, which the 8192-token vocabulary dominates at
small widths), the teacher's validation ppl, each student's agreement with the AR teacher's own
noise -> token map per slot, its quality relative to the AR samples, its measured speed-up per
batch size and the batch size where that speed-up crosses 1 (`crossover_batch`).
"""

import math

import jax
import ml_collections

from kforcing_jax import models, progress, report, rundir

# parameters that belong to the vocabulary rather than the network's width and depth
_VOCAB_PARAMS = ('embed', 'head', 'head_bias')


def names(config, only: list[str] | None = None) -> list[str]:
  """The sweep's size names, in config order (`only`: a subset, checked)."""
  if 'sizes' not in config:
    raise ValueError('the config has no `sizes` block: the sweep needs one (configs/sizes.py).')
  declared = list(config.sizes.names)
  for name in declared:
    if name not in config.sizes:
      raise ValueError(f'config.sizes.names lists {name!r} but config.sizes has no {name!r} block.')
  if not only:
    return declared
  unknown = [n for n in only if n not in declared]
  if unknown:
    raise ValueError(f'unknown size(s) {unknown}; config.sizes.names is {declared}.')
  return [n for n in declared if n in only]


def size_config(config, name: str, evaluator_workdir: str) -> ml_collections.ConfigDict:
  """`config` with size `name`'s model fields, scored by the evaluator at `evaluator_workdir`."""
  sized = ml_collections.ConfigDict(config.to_dict())
  overrides = config.sizes[name]
  for key, value in overrides.items():
    if key not in sized.model:
      raise ValueError(f'config.sizes.{name}.{key}: the model block has no field {key!r}.')
    sized.model[key] = value
  sized.eval.evaluator_workdir = evaluator_workdir
  del sized['sizes']
  return sized


def parameter_counts(config) -> dict:
  """{'all': ..., 'non_vocab': ...}: the AR teacher's parameters, and those outside the token
  embedding and the output head (the part that grows with width and depth)."""
  shapes = models.teacher(config).param_shapes
  total = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
  vocab = sum(math.prod(x.shape) for key in _VOCAB_PARAMS if key in shapes
              for x in jax.tree.leaves(shapes[key]))
  return {'all': total, 'non_vocab': total - vocab}


def crossover_batch(speedups: dict[int, float]) -> float | None:
  """The batch size where a speed-up curve first falls through 1, interpolated linearly in
  log(batch) between the two measured batch sizes around it; None when it never does (above 1
  at every measured batch) and 0.0 when it is at or below 1 from the smallest batch on."""
  points = sorted(speedups.items())
  if not points:
    return None
  if points[0][1] <= 1.0:
    return 0.0
  for (b0, s0), (b1, s1) in zip(points, points[1:]):
    if s0 > 1.0 >= s1:
      t = (s0 - 1.0) / (s0 - s1)
      return float(math.exp(math.log(b0) + t * (math.log(b1) - math.log(b0))))
  return None


def _interval(ci) -> list[float] | None:
  return None if ci is None else [ci['lo'], ci['hi']]


def size_row(name: str, config, results: dict, teacher_eval: dict, stage_evals: dict) -> dict:
  """One size: its model, its teacher, and per student (with its decode penalty) agreement,
  quality relative to the AR samples and speed (from evaluate's results.json)."""
  by_name = {m['name']: m for m in results['models']}
  ar = by_name['ar']
  ar_speed = {t['batch']: t['tokens_per_s'] for t in ar['throughput']}
  students = []
  for m in results['models']:
    if m['kind'] != 'pflm' or not m['throughput']:
      continue  # the _nopen rows are quality-only; the lossless rows are not this sweep's
    speed = {t['batch']: t['speedup_vs_ar'] for t in m['throughput']}
    agreement = m.get('agreement_vs_ar') or {}
    students.append(dict(
        k=m['k'], freq_penalty=m['freq_penalty'], acc_total=m['acc_total'],
        agreement_vs_ar_slot=agreement.get('slot'), agreement_vs_ar_prefix=agreement.get('prefix'),
        gen_ppl_teacher=m['gen_ppl_teacher'], gen_ppl_teacher_ci=_interval(m['gen_ppl_teacher_ci']),
        gen_ppl_evaluator=m['gen_ppl_evaluator'],
        gen_ppl_evaluator_ci=_interval(m['gen_ppl_evaluator_ci']),
        gen_ppl_evaluator_vs_ar=_ratio(m['gen_ppl_evaluator'], ar['gen_ppl_evaluator']),
        entropy=m['entropy'], entropy_vs_ar=_ratio(m['entropy'], ar['entropy']),
        distinct_2=m['distinct_2'], distinct_2_vs_ar=_ratio(m['distinct_2'], ar['distinct_2']),
        mode_seeking=m['mode_seeking'],
        speedup_vs_ar={str(b): s for b, s in sorted(speed.items())},
        crossover_batch=crossover_batch(speed),
        distill_steps=(stage_evals.get(m['k']) or {}).get('steps'),
        distill_seconds=(stage_evals.get(m['k']) or {}).get('seconds')))
  model = config.model
  return dict(
      name=name, d_model=model.d_model, num_layers=model.num_layers, num_heads=model.num_heads,
      num_kv_heads=model.get('num_kv_heads', 0) or model.num_heads,
      params=parameter_counts(config),
      ar_teacher=dict(val_ppl=teacher_eval.get('val_ppl'), steps=teacher_eval.get('train_steps'),
                   seconds=teacher_eval.get('seconds')),
      ar=dict(gen_ppl_teacher=ar['gen_ppl_teacher'], gen_ppl_evaluator=ar['gen_ppl_evaluator'],
              gen_ppl_evaluator_ci=_interval(ar['gen_ppl_evaluator_ci']),
              entropy=ar['entropy'], distinct_2=ar['distinct_2'],
              tokens_per_s={str(b): s for b, s in sorted(ar_speed.items())}),
      students=sorted(students, key=lambda s: s['k']),
      evaluator=results.get('evaluator'), device=results.get('device'))


def _ratio(a, b):
  return None if a is None or b is None or not b else a / b


def collect(config, workdir: str, size_names: list[str]) -> dict:
  """The sweep's rows from each size's report/results.json and model eval.json files."""
  rows = []
  for name in size_names:
    directory = rundir.size_workdir(workdir, name)
    results = progress.read_json(rundir.report_dir(directory) + '/results.json')
    if results is None:
      raise FileNotFoundError(f'{directory} has no report/results.json: run the sweep for size '
                              f'{name!r} first.')
    teacher_eval = progress.read_json(rundir.eval_path(rundir.teacher_dir(directory))) or {}
    stage_evals = {k: progress.read_json(rundir.eval_path(rundir.stage_dir(directory, k)))
                   for k, _ in config.distill.stages}
    rows.append(size_row(name, size_config(config, name, ''), results, teacher_eval,
                         stage_evals))
  return dict(sizes=rows, batch_sizes=list(config.eval.batch_sizes),
              stages=[list(s) for s in config.distill.stages])


def _fmt(value, spec: str, missing: str = '-') -> str:
  return missing if value is None else format(value, spec)


def _crossover_text(value) -> str:
  if value is None:
    return '> all measured'
  if value == 0.0:
    return '< 1 from B=1'
  return f'~{value:.0f}'


def markdown(result: dict) -> str:
  """Two tables: the sizes (model, teacher, AR samples), then every student per size."""
  rows = result['sizes']
  batches = result['batch_sizes']
  lines = ['| size | d / layers / heads (K/V) | parameters (outside embedding + head) | '
           'teacher val ppl | AR gen. ppl, evaluator | AR entropy | AR tokens/s B=1 |',
           '|---|---|---|---|---|---|---|']
  smallest = min(r['params']['all'] for r in rows)
  smallest_nv = min(r['params']['non_vocab'] for r in rows)
  for r in rows:
    p = r['params']
    ci = r['ar']['gen_ppl_evaluator_ci']
    lines.append(
        f"| {r['name']} | {r['d_model']} / {r['num_layers']} / {r['num_heads']} "
        f"({r['num_kv_heads']}) | {p['all'] / 1e6:.2f}M ({p['all'] / smallest:.1f}x); "
        f"{p['non_vocab'] / 1e6:.2f}M ({p['non_vocab'] / smallest_nv:.0f}x) | "
        f"{_fmt(r['ar_teacher']['val_ppl'], '.1f')} | {r['ar']['gen_ppl_evaluator']:.1f}"
        + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else '')
        + f" | {r['ar']['entropy']:.3f} | {r['ar']['tokens_per_s'].get(str(batches[0]), 0):.0f} |")
  lines += ['', '| size | k | agreement with the AR map, per slot | acc_total (vs its stage teacher) '
            '| gen. ppl evaluator (vs AR) | entropy vs AR | distinct-2 vs AR | mode-seeking | '
            + ' | '.join(f'speed-up B={b}' for b in batches) + ' | speed-up crosses 1 at B |',
            '|---|---|---|---|---|---|---|---|' + '---|' * len(batches) + '---|']
  for r in rows:
    for s in r['students']:
      slots = s['agreement_vs_ar_slot']
      ci = s['gen_ppl_evaluator_ci']
      lines.append(
          f"| {r['name']} | {s['k']} | {' / '.join(f'{a:.3f}' for a in slots) if slots else '-'} | "
          f"{_fmt(s['acc_total'], '.3f')} | {s['gen_ppl_evaluator']:.1f}"
          + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else '')
          + f" ({_fmt(s['gen_ppl_evaluator_vs_ar'], '.2f')}x) | {_fmt(s['entropy_vs_ar'], '.3f')} | "
          f"{_fmt(s['distinct_2_vs_ar'], '.3f')} | {'yes' if s['mode_seeking'] else 'no'} | "
          + ' | '.join(_fmt(s['speedup_vs_ar'].get(str(b)), '.2f') + 'x' for b in batches)
          + f" | {_crossover_text(s['crossover_batch'])} |")
  return '\n'.join(lines) + '\n'


_COLOURS = ('tab:blue', 'tab:orange', 'tab:green', 'tab:red', 'tab:purple', 'tab:brown')


def plot(path, result: dict) -> None:
  """sizes.png: (1) k = 4 speed-up over AR against batch size, one line per size; (2) per-slot
  agreement of the k = 4 student with the AR teacher's map against parameters; (3) gen. ppl
  under the evaluator over the AR samples' against parameters, one line per k."""
  rows = result['sizes']

  def draw(axes):
    ax_speed, ax_agree, ax_quality = axes
    for colour, r in zip(_COLOURS, rows):
      widest = r['students'][-1] if r['students'] else None
      if widest is None:
        continue
      curve = sorted((int(b), s) for b, s in widest['speedup_vs_ar'].items())
      ax_speed.plot([b for b, _ in curve], [s for _, s in curve], marker='o', color=colour,
                    label=f"{r['name']} k={widest['k']}")
    ax_speed.axhline(1.0, color='grey', lw=0.6)
    ax_speed.set_xscale('log', base=2)
    ax_speed.set_xlabel('batch size')
    ax_speed.set_ylabel('tokens/s over AR (measured)')
    ax_speed.legend(fontsize=7)
    mha = [r for r in rows if r['num_kv_heads'] == r['num_heads']]
    for r in rows:
      if r['students'] and r['students'][-1]['agreement_vs_ar_slot']:
        slots = r['students'][-1]['agreement_vs_ar_slot']
        marker = 'o' if r in mha else 'x'
        for i, a in enumerate(slots):
          ax_agree.scatter([r['params']['all']], [a], color=_COLOURS[i % len(_COLOURS)],
                           marker=marker, label=f'slot {i + 1}' if r is rows[0] else None)
    ax_agree.set_xscale('log')
    ax_agree.set_xlabel('parameters (x: multi-query attention)')
    ax_agree.set_ylabel('agreement with the AR map (widest student)')
    ax_agree.legend(fontsize=7)
    ks = sorted({s['k'] for r in rows for s in r['students']})
    for colour, k in zip(_COLOURS, ks):
      pts = [(r['params']['all'], s['gen_ppl_evaluator_vs_ar']) for r in mha
             for s in r['students'] if s['k'] == k and s['gen_ppl_evaluator_vs_ar']]
      ax_quality.plot([p for p, _ in pts], [q for _, q in pts], marker='o', color=colour,
                      label=f'k={k}')
    ax_quality.axhline(1.0, color='grey', lw=0.6)
    ax_quality.set_xscale('log')
    ax_quality.set_xlabel('parameters (multi-head sizes)')
    ax_quality.set_ylabel('gen. ppl under the evaluator / AR samples\'')
    ax_quality.legend(fontsize=7)
    ax_speed.set_title(rows[0].get('device') or '', fontsize=8)

  report.plot(path, draw, ncols=3, figsize=(15, 4.5))
