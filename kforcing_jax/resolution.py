"""How finely a k=1 student resolves its teacher's noise -> token map.

Run by benchmarks/noise_map.py.

`sweep` runs u over evenly spaced points of [0, 1) on held-out windows and compares, at each, the
AR teacher's inverse-CDF token with the student's readout, for every window at once; `markdown`
and `plot` turn results into a table and a figure of both maps on example windows.
"""

import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax import agreement, data, distill, rundir, sampling, sharding

# the plot's example windows: the held-out window with the entropy (nats) nearest each
EXAMPLE_ENTROPIES = (2.0, 4.0, 6.0)
# the teacher's mass on its S likeliest tokens, averaged over windows, for these S
TOP_MASS_COUNTS = (10, 20, 30, 50, 100)


def runs_along(x: np.ndarray) -> int:
  """Constant runs of a 1-d sequence (1 + the number of changes)."""
  return 1 + int(np.count_nonzero(x[1:] != x[:-1]))


def sweep(config, workdir: str, points: int, batches: int) -> dict:
  layout = sharding.layout_from_config(config)
  tokenizer = data.prepared_tokenizer(config)
  ar, student = rundir.load_teacher_and_stage(config, workdir, 1, layout, tokenizer)
  order = student.model.cfg.cdf_order
  if order == 'gumbel':  # refused before the sweep, not at its plot's first example
    raise ValueError('the noise map places tokens by their CDF intervals: model.cdf_order='
                     'gumbel has none (benchmarks/coupling.py measures such students).')
  us = (jnp.arange(points, dtype=jnp.float32) + 0.5) / points

  @jax.jit
  def maps(tokens):
    """(teacher tokens (U, B, N), student tokens (U, B, N), teacher probs (B, N, V), teacher
    entropy (B, N))."""
    rows, n = tokens.shape
    ar_logits, _ = ar.model.module(ar.params)(tokens)
    probs = sampling.probabilities(ar_logits)

    def at(u):
      noise = jnp.full((rows, n, 1), u)
      logits, _ = student.model.module(student.params)(tokens, noise, jnp.ones((rows,)))
      return (sampling.inverse_cdf_from_probs(probs, noise[..., 0], order),
              sampling.student_tokens(student.model.cfg, logits[..., 0, :], noise[..., 0]))

    teacher_tokens, student_tokens = jax.lax.map(at, us)
    return teacher_tokens, student_tokens, probs, agreement.entropy_and_mode(ar_logits)[0]

  @jax.jit
  def positions(probs, tokens):
    """Midpoint of each student token's interval in the teacher's CDF (NaN where empty)."""
    lo, hi = sampling.token_cdf_interval(probs, tokens, order)
    return jnp.where(hi > lo, (lo + hi) / 2, jnp.nan)

  val_at = distill.stage_batches(config, layout, 1, 'validation', False,
                                 distill.VALIDATION_SEED_OFFSET, tokenizer)
  per_window = {'entropy': [], 'agreement': [], 'teacher_distinct': [], 'student_distinct': [],
                'teacher_segments': [], 'student_segments': [], 'best_with_student_count': []}
  top_mass = {s: [] for s in TOP_MASS_COUNTS}
  examples = {}
  for b in range(batches):
    batch = val_at(b)
    valid = np.asarray(jax.device_get(distill.window_mask(batch['mask'], 1)))
    t_host, s_host, p, entropy = map(np.asarray, maps(batch['tokens']))
    # cumulative mass of the likeliest tokens, per window: (B, N, V) sorted descending
    cumulative = np.cumsum(-np.sort(-p, axis=-1), axis=-1)
    for r, t in zip(*np.nonzero(valid)):
      t_map, s_map = t_host[:, r, t], s_host[:, r, t]
      per_window['entropy'].append(float(entropy[r, t]))
      per_window['agreement'].append(float(np.mean(t_map == s_map)))
      student_distinct = len(np.unique(s_map))
      per_window['teacher_distinct'].append(len(np.unique(t_map)))
      per_window['student_distinct'].append(student_distinct)
      per_window['teacher_segments'].append(runs_along(t_map))
      per_window['student_segments'].append(runs_along(s_map))
      per_window['best_with_student_count'].append(
          float(cumulative[r, t, student_distinct - 1]))
      for count in TOP_MASS_COUNTS:
        top_mass[count].append(float(cumulative[r, t, count - 1]))
      for target in EXAMPLE_ENTROPIES:
        gap = abs(entropy[r, t] - target)
        if gap < 0.25 and (target not in examples or gap < examples[target]['gap']):
          row = jnp.asarray(p[r, t])[None].repeat(points, 0)
          listed = lambda m: [None if np.isnan(x) else float(x)  # noqa: E731
                              for x in np.asarray(positions(row, jnp.asarray(m)))]
          examples[target] = {'gap': float(gap), 'entropy': float(entropy[r, t]),
                              'agreement': float(np.mean(t_map == s_map)),
                              'teacher_position': listed(t_map),
                              'student_position': listed(s_map)}
  values = {name: np.asarray(v, np.float64) for name, v in per_window.items()}
  edges = agreement.ENTROPY_EDGES
  bins = np.asarray(agreement.entropy_bin(values['entropy'], edges))
  by_entropy = []
  for i, lo in enumerate(edges):
    chosen = bins == i
    row = {'lo': lo, 'hi': edges[i + 1] if i + 1 < len(edges) else None,
           'share': float(np.mean(chosen))}
    if chosen.any():
      row.update({name: float(np.mean(v[chosen])) for name, v in values.items()
                  if name != 'entropy'})
    by_entropy.append(row)
  overall = {name: float(np.mean(v)) for name, v in values.items()}
  return {'workdir': workdir, 'points': points, 'windows': int(len(values['entropy'])),
          'readout': student.model.cfg.readout, 'overall': overall, 'by_entropy': by_entropy,
          'teacher_top_mass': {str(c): float(np.mean(v)) for c, v in top_mass.items()},
          'examples': [dict(examples[e], target_entropy=e) for e in EXAMPLE_ENTROPIES
                       if e in examples]}


def markdown(results: dict) -> str:
  lines = ['# How finely the k=1 students resolve the noise -> token map', '',
           'Made by `python -m kforcing_jax.benchmarks.noise_map` (module docstring). Per '
           'held-out window, u sweeps the points of [0, 1); agreement = share of them where the '
           'student emits the AR teacher\'s token (its acc_1 for that context); distinct / '
           'segments = different tokens / constant runs along u, teacher vs student.', '',
           '| run | windows | agreement | at most, with its count of tokens | distinct tokens '
           'teacher / student | segments teacher / student | teacher mass on its '
           + ' / '.join(map(str, TOP_MASS_COUNTS)) + ' likeliest |',
           '|---|---|---|---|---|---|---|']
  for label, r in results.items():
    o = r['overall']
    lines.append(f'| {label} ({r["readout"]}) | {r["windows"]} | {o["agreement"]:.3f} | '
                 f'{o["best_with_student_count"]:.3f} | '
                 f'{o["teacher_distinct"]:.1f} / {o["student_distinct"]:.1f} | '
                 f'{o["teacher_segments"]:.1f} / {o["student_segments"]:.1f} | '
                 + ' / '.join(f'{r["teacher_top_mass"][str(c)]:.2f}' for c in TOP_MASS_COUNTS)
                 + ' |')
  lines += ['', 'By the teacher\'s entropy (nats): share of windows, agreement, segments '
            'teacher / student.', '',
            '| run | ' + ' | '.join(_bin_name(b) for b in next(iter(results.values()))
                                    ['by_entropy']) + ' |',
            '|---|' + '---|' * len(next(iter(results.values()))['by_entropy'])]
  for label, r in results.items():
    cells = []
    for b in r['by_entropy']:
      cells.append(f'{b["share"]:.2f}: {b["agreement"]:.2f}, {b["teacher_segments"]:.0f} / '
                   f'{b["student_segments"]:.0f}' if 'agreement' in b else f'{b["share"]:.2f}')
    lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def _bin_name(b: dict) -> str:
  return f'[{b["lo"]:g}, {b["hi"]:g})' if b['hi'] is not None else f'>= {b["lo"]:g}'


def plot(results: dict, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(len(results), len(EXAMPLE_ENTROPIES), squeeze=False,
                           figsize=(4 * len(EXAMPLE_ENTROPIES), 3.2 * len(results)))
  for row, (label, r) in enumerate(results.items()):
    by_target = {e['target_entropy']: e for e in r['examples']}
    for col, target in enumerate(EXAMPLE_ENTROPIES):
      ax = axes[row][col]
      if target in by_target:
        e = by_target[target]
        u = (np.arange(r['points']) + 0.5) / r['points']
        for key, colour, name in (('teacher_position', '0.6', 'AR teacher'),
                                  ('student_position', 'C0', 'student')):
          y = np.asarray([np.nan if v is None else v for v in e[key]])
          ax.plot(u, y, '.', ms=2, color=colour, label=name)
        ax.set_title(f'H = {e["entropy"]:.1f} nats, agreement {e["agreement"]:.2f}', fontsize=8)
        ax.legend(fontsize=6, markerscale=3, loc='upper left')
      ax.set_xlabel('u', fontsize=8)
      if col == 0:
        ax.set_ylabel(f'{label}\ntoken\'s place in the teacher CDF', fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
