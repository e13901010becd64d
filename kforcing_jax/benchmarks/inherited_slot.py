"""Why stage k=2 loses the slot it inherits: where the k=1 student's argmax map is fragile.

A k=2 student starts as an exact copy of its k=1 teacher (acc_1 = 1 on held-out windows) and ends
the demo recipe's stage at ~0.64. This probe trains stage k=2 of a study arm (phase 6: stage k=2
over a linked k=1 student, e.g. k2_base) from that arm's k=1 student with several optimizer /
loss variants on the same batches, and after steps 0, 1, 2, 3, 5, 10, 20, ... measures on
held-out windows: acc_1 / acc_2 / acc_total against the k=1 teacher, and which slot-1 tokens
flipped, broken down by the k=1 student's logit margin (top-1 minus top-2 logit) at that window.
It also gives, per margin bin, the share of windows and the k=1 student's agreement with the AR
teacher's own map for the same noise.

Variants: `base` (the stage as configured), `carry_adam` (Adam's moments and count carried over
from the k=1 student's final checkpoint; the learning-rate schedule restarts), or
`field=value[;field=value]` overrides of config.distill (e.g. inherited_slot_weight=1000: slot 1
alone is trained, on its own teacher's tokens).

  python -m kforcing_jax.benchmarks.inherited_slot --config=configs/distill_study.py \
      --arm=k2_base --seeds=0,1 \
      --variants='base,carry_adam,inherited_slot_weight=1000,later_learning_rate=1e-4' \
      --output=results/distill_study/inherited_slot.json

writes the JSON and its table (the same path, .md), and prints one line per (variant, step);
--from_json=F.json writes F.md again from a saved run.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags

from kforcing_jax import checkpoints, data, distill, progress, rundir, sharding, train_state
from kforcing_jax.models.pflm import init_from
from kforcing_jax.study import apply_overrides, arms_of

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/distill_study.py', 'study config')
_ARM = flags.DEFINE_string('arm', 'k2_base', 'a study arm with stages k=1 and k=2 whose stage '
                           'k=1 is linked from another arm (stage1_from)')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1'], 'the seeds of the k=1 runs used, one probe each')
_RUNS = flags.DEFINE_string('runs', 'results/distill_study/runs', "the study's runs")
_STEPS = flags.DEFINE_integer('steps', 20, 'k=2 updates per variant')
_VARIANTS = flags.DEFINE_list('variants', ['base', 'carry_adam'], 'see the module docstring')
_EVAL_BATCHES = flags.DEFINE_integer('eval_batches', 4, 'held-out batches')
_OUTPUT = flags.DEFINE_string('output', '', 'JSON path (empty: print only)')
_FROM_JSON = flags.DEFINE_string('from_json', '', 'only write the table of this saved JSON')

MEASURED_AT = (0, 1, 2, 3, 5, 10, 20, 50, 100)
# lower edges of the margin bins (logits); the last bin is open
MARGIN_EDGES = (0.0, 0.1, 0.3, 1.0, 3.0)


def margin_bin(margin: np.ndarray) -> np.ndarray:
  return np.searchsorted(np.asarray(MARGIN_EDGES), margin, side='right') - 1


def carry_adam(fresh_opt_state, old_opt_state):
  """fresh_opt_state with every ScaleByAdamState (count, mu, nu) taken from old_opt_state."""
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
  old = iter([x for x in jax.tree.leaves(old_opt_state, is_leaf=is_adam) if is_adam(x)])
  return jax.tree.map(lambda x: next(old) if is_adam(x) else x, fresh_opt_state, is_leaf=is_adam)


def variant_overrides(variant: str) -> dict:
  if variant in ('base', 'carry_adam'):
    return {}
  out = {}
  for item in variant.split(';'):
    field, _, value = item.partition('=')
    out['distill.' + field] = float(value)
  return out


def _mean(values) -> str:
  return f'{np.mean(values):.2f}'


def markdown(out: dict) -> str:
  """The tables of a probe: the k=1 students' margins, then per variant (means over seeds)."""
  runs = list(out['seeds'].values())
  edges = out['margin_edges']
  names = [f'< {edges[i + 1]:g}' if i + 1 < len(edges) else f'>= {lo:g}'
           for i, lo in enumerate(edges)]
  names = [n if i == 0 else f'{edges[i]:g}-{edges[i + 1]:g}' if i + 1 < len(edges) else n
           for i, n in enumerate(names)]
  seeds = ', '.join(out['seeds'])
  lines = [f'# Why stage k=2 loses its inherited slot (arm {out["arm"]}, seeds {seeds})', '',
           'Made by `python -m kforcing_jax.benchmarks.inherited_slot` (module docstring); '
           'means over the seeds. The k=1 students\' top-1 minus top-2 logit gap on '
           f'{runs[0]["windows"]} held-out windows:', '',
           '| gap | ' + ' | '.join(names) + ' |', '|---|' + '---|' * len(names),
           '| share of windows | ' + ' | '.join(
               _mean([r['k1_by_margin'][i]['share'] for r in runs]) for i in range(len(names)))
           + ' |',
           '| agreement with the AR map | ' + ' | '.join(
               _mean([r['k1_by_margin'][i]['agreement_vs_ar'] for r in runs])
               for i in range(len(names))) + ' |', '']
  steps = [s for s in (1, 2, 5, 10, 20, 50, 100)
           if all(s in {row['step'] for row in c} for r in runs for c in r['variants'].values())]
  last = steps[-1]
  lines += [f'| variant | held-out acc_1 after {" / ".join(map(str, steps))} updates | acc_2 at '
            f'{last} | slot 1 vs AR map at {last} (at 0: '
            + _mean([r['k1_agreement_vs_ar'] for r in runs])
            + f') | slot 1 flipped at {last} by gap ' + ' / '.join(names) + ' |',
            '|---|---|---|---|---|']
  for variant in runs[0]['variants']:
    rows = [{row['step']: row for row in r['variants'][variant]} for r in runs]
    lines.append(
        f'| `{variant}` | ' + ' / '.join(_mean([c[s]['acc_1'] for c in rows]) for s in steps)
        + f' | {_mean([c[last]["acc_2"] for c in rows])} | '
        + f'{np.mean([c[last]["slot1_vs_ar"] for c in rows]):.3f} | '
        + ' / '.join(_mean([c[last]['flipped_by_margin'][i] for c in rows])
                     for i in range(len(names))) + ' |')
  return '\n'.join(lines) + '\n'


def write_table(json_path: str, out: dict) -> None:
  path = os.path.splitext(json_path)[0] + '.md'
  with open(path, 'w') as f:
    f.write(markdown(out))
  progress.log(f'wrote {path}')


def main(_):
  if _FROM_JSON.value:
    with open(_FROM_JSON.value) as f:
      write_table(_FROM_JSON.value, json.load(f))
    return
  arms = {a.name: a for a in arms_of(_CONFIG.value)}
  arm = arms.get(_ARM.value)
  if arm is None or not arm.stage1_from:
    raise app.UsageError(f'--arm={_ARM.value!r}: name an arm with stage1_from, one of '
                         f'{sorted(a.name for a in arms.values() if a.stage1_from)}.')
  out = {'arm': arm.name, 'margin_edges': list(MARGIN_EDGES),
         'seeds': {seed: probe(arm, int(seed)) for seed in _SEEDS.value}}
  if _OUTPUT.value:
    with open(_OUTPUT.value, 'w') as f:
      json.dump(out, f, indent=1)
    progress.log(f'wrote {_OUTPUT.value}')
    write_table(_OUTPUT.value, out)


def probe(arm, seed: int) -> dict:
  """One k=1 run's margins and every variant's curve."""
  config = apply_overrides(_CONFIG.value, arm.overrides, seed)
  if config.model.readout != 'argmax':
    raise app.UsageError('this probe reads argmax tokens: the arm must use model.readout=argmax.')
  stages = dict(distill.validate_schedule(config.distill.stages))
  if set(stages) != {1, 2}:
    raise app.UsageError(f'arm {arm.name} has stages {sorted(stages)}; the probe needs 1 and 2.')
  source = os.path.join(_RUNS.value, arm.stage1_from, f'seed{seed}')
  if not os.path.exists(rundir.eval_path(rundir.stage_dir(source, 1))):
    raise app.UsageError(f'{source} has no finished stage k=1: run the study arm '
                         f'{arm.stage1_from} seed {seed} first.')
  layout = sharding.layout_from_config(config)
  tokenizer = data.prepared_tokenizer(config)
  teachers = distill.load_teachers(config, source, layout, 1, tokenizer)
  k1, ar = teachers.teacher, teachers.ar
  val_at = distill.stage_batches(config, layout, 2, 'validation', False,
                                 distill.VALIDATION_SEED_OFFSET, tokenizer)
  held_out = [val_at(i) for i in range(_EVAL_BATCHES.value)]
  train_at = distill.stage_batches(config, layout, 2, 'train', True, 0, tokenizer)

  @jax.jit
  def k1_view(params, ar_params, batch):
    """The k=1 student's slot-1 token and margin, and the AR map's token, per window."""
    u1 = batch['u'][..., :1]
    logits, _ = k1.model.module(params)(batch['tokens'], u1, batch['tau'])
    top2 = jax.lax.top_k(logits[..., 0, :], 2)[0]
    ar_tok = distill.ar_targets(ar.model, ar_params, batch['tokens'], u1, batch['tau'])[..., 0]
    return jnp.argmax(logits[..., 0, :], -1), top2[..., 0] - top2[..., 1], ar_tok

  views = [jax.device_get(k1_view(k1.params, ar.params, b)) for b in held_out]
  valid = [np.asarray(jax.device_get(distill.window_mask(b['mask'], 2))) for b in held_out]
  k1_tok = np.concatenate([v[0][m] for v, m in zip(views, valid)])
  margin = np.concatenate([v[1][m] for v, m in zip(views, valid)])
  ar_tok = np.concatenate([v[2][m] for v, m in zip(views, valid)])
  bins = margin_bin(margin)
  margins = [{'lo': lo, 'share': float(np.mean(bins == i)),
              'agreement_vs_ar': float(np.mean(k1_tok[bins == i] == ar_tok[bins == i]))
              if np.any(bins == i) else None}
             for i, lo in enumerate(MARGIN_EDGES)]
  progress.log(f'k=1 student {source}: {len(k1_tok)} held-out windows, agreement with the AR '
               f'map {np.mean(k1_tok == ar_tok):.3f}; by margin: '
               + ', '.join(f'>={b["lo"]}: {b["share"]:.2f} of windows, {b["agreement_vs_ar"]}'
                           for b in margins))

  k1_program = distill.stage_program(config, layout, 1, None, stages[1])
  ckpt = checkpoints.Checkpointer(os.path.join(rundir.stage_dir(source, 1), 'checkpoints'),
                                  async_save=False)
  k1_state, _ = ckpt.restore(stages[1], k1_program.abstract_state)

  results = {}
  for variant in _VARIANTS.value:
    cfg = apply_overrides(config, variant_overrides(variant), config.seed)
    program = distill.stage_program(cfg, layout, 2, 1, stages[2])
    student = program.model
    rng = jax.random.key(cfg.seed + 2000)
    state = train_state.make_init_state(student, program.optimizer, program.abstract_state)(rng)
    state['params'] = init_from(k1.params, jax.jit(student.init)(rng), k1.kind)[0]
    if variant == 'carry_adam':
      state['opt_state'] = carry_adam(state['opt_state'], k1_state['opt_state'])

    @jax.jit
    def stage_view(params, teacher_params, batch):
      targets = distill.stage_targets(k1.model, teacher_params, batch['tokens'], batch['u'],
                                      batch['tau'])
      logits, _ = student.module(params)(batch['tokens'], batch['u'], batch['tau'])
      return jnp.argmax(logits, -1), targets

    curve = []
    for step in range(_STEPS.value + 1):
      if step in MEASURED_AT or step == _STEPS.value:
        got = [jax.device_get(stage_view(state['params'], k1.params, b)) for b in held_out]
        tok = np.concatenate([g[0][m] for g, m in zip(got, valid)])
        tgt = np.concatenate([g[1][m] for g, m in zip(got, valid)])
        flipped = tok[:, 0] != k1_tok
        row = {'step': step, 'acc_1': float(np.mean(tok[:, 0] == tgt[:, 0])),
               'acc_2': float(np.mean(tok[:, 1] == tgt[:, 1])),
               'acc_total': float(np.mean(np.all(tok == tgt, -1))),
               'slot1_vs_ar': float(np.mean(tok[:, 0] == ar_tok)),
               'flipped_by_margin': [float(np.mean(flipped[bins == i]))
                                     if np.any(bins == i) else None
                                     for i in range(len(MARGIN_EDGES))]}
        curve.append(row)
        progress.log(f'seed {seed} {variant} step {step}: acc_1 {row["acc_1"]:.3f} '
                     f'acc_2 {row["acc_2"]:.3f} '
                     f'acc_total {row["acc_total"]:.3f} slot 1 vs AR {row["slot1_vs_ar"]:.3f}; '
                     'slot 1 flipped by margin bin '
                     + ' '.join(f'{f:.2f}' if f is not None else '-'
                                for f in row['flipped_by_margin']))
      if step < _STEPS.value:
        state, _ = program.step(state, train_at(step), k1.params, None)
    results[variant] = curve

  return {'source': source, 'stages': stages,
          'windows': int(len(k1_tok)), 'margin_edges': list(MARGIN_EDGES),
          'k1_agreement_vs_ar': float(np.mean(k1_tok == ar_tok)), 'k1_by_margin': margins,
          'variants': results}


if __name__ == '__main__':
  app.run(main)
