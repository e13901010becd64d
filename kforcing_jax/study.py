"""The distillation-recipe study: arms (config overrides) x seeds over one frozen AR teacher.

Every run is a full `distill.run` in its own workdir (results/<study>/runs/<arm>/seed<S>, with
the teacher directory linked in), so an arm is exactly what a user gets by setting the same
config fields. A finished run leaves `<output>/<arm>__seed<S>.json`: the arm's overrides, the
final held-out metrics of every stage, and its learning curves (train per log step, held-out
per eval step). `summarize` turns those files into SUMMARY.md (mean and range over seeds) and
one learning-curve plot per arm. Resumable: finished runs are skipped, an interrupted one
resumes from its checkpoints.
"""

import copy
import dataclasses
import json
import os
import time

import numpy as np

from kforcing_jax import agreement, data, distill, progress, rundir, sharding


@dataclasses.dataclass(frozen=True)
class Arm:
  name: str
  overrides: dict          # dotted config path -> value, e.g. {'model.noise_scale': 1000.0}
  note: str = ''
  # an arm whose stage k=1 is exactly this arm's (same k=1 settings and seed): its finished
  # student_k1 is linked in instead of trained again (distill.run skips a finished stage)
  stage1_from: str = ''


# overrides that change only the stages k >= 2 (and the schedule, whose first stage is checked
# apart): an arm may differ from its `stage1_from` arm in these and nothing else
LATER_STAGE_FIELDS = ('distill.stages', 'distill.later_learning_rate', 'distill.logit_matching',
                      'distill.inherited_slot_weight',
                      # a k = 1 student has no feedback block (models/pflm.py)
                      'model.token_feedback')


def check_stage1_source(arm: Arm, arms: list[Arm]) -> None:
  """An arm that reuses another arm's stage k=1 must have the same k=1 settings and steps."""
  if not arm.stage1_from:
    return
  source = next((a for a in arms if a.name == arm.stage1_from), None)
  if source is None:
    raise ValueError(f'study arm {arm.name!r}: stage1_from={arm.stage1_from!r} is not an arm.')
  stage1 = lambda o: {f: v for f, v in o.items() if f not in LATER_STAGE_FIELDS}  # noqa: E731
  first = lambda o: tuple(o.get('distill.stages', ((None, None),))[0])  # noqa: E731
  if stage1(source.overrides) != stage1(arm.overrides) or first(source.overrides) != first(
      arm.overrides):
    raise ValueError(f'study arm {arm.name!r} reuses stage k=1 of {source.name!r}, whose k=1 '
                     f'settings differ: {source.overrides} vs {arm.overrides}.')


def apply_overrides(config, overrides: dict, seed: int):
  """A copy of `config` with `overrides` set (each path must exist) and `seed`."""
  config = copy.deepcopy(config)
  with config.unlocked():
    for path, value in overrides.items():
      *parents, leaf = path.split('.')
      node = config
      for name in parents:
        node = node[name]
      if leaf not in node:
        raise KeyError(f'study override {path!r}: the config has no field {leaf!r} there.')
      node[leaf] = tuple(value) if isinstance(value, list) else value
    config.seed = seed
  return config


def run_name(arm: Arm, seed: int) -> str:
  return f'{arm.name}__seed{seed}'


def run_arm(config, arm: Arm, seed: int, teacher_workdir: str, output: str) -> dict:
  """Distil every stage of the arm's config for one seed; write and return its record (None
  when another worker holds the run)."""
  out_path = os.path.join(output, run_name(arm, seed) + '.json')
  config = apply_overrides(config, arm.overrides, seed)
  workdir = os.path.join(output, 'runs', arm.name, f'seed{seed}')
  done = progress.read_json(out_path)
  if done is not None:
    progress.log(f'[study] {run_name(arm, seed)} already done ({out_path})')
    if 'agreement_vs_ar' not in done:  # a record of an earlier version of the study
      done['agreement_vs_ar'] = agreement_vs_ar(config, workdir)
      progress.write_json(out_path, done)
    return done
  os.makedirs(workdir, exist_ok=True)
  if not claim(workdir):
    progress.log(f'[study] {run_name(arm, seed)} is being run by another worker; next')
    return None
  link = rundir.teacher_dir(workdir)
  if not os.path.exists(link):
    os.symlink(os.path.abspath(rundir.teacher_dir(teacher_workdir)), link)
  if arm.stage1_from:
    source = rundir.stage_dir(os.path.join(output, 'runs', arm.stage1_from, f'seed{seed}'), 1)
    if not os.path.exists(rundir.eval_path(source)):
      progress.log(f'[study] {run_name(arm, seed)} reuses stage k=1 of arm {arm.stage1_from}, '
                   f'which has not finished seed {seed} ({source}); next (run it first)')
      return None
    if not os.path.exists(rundir.stage_dir(workdir, 1)):
      os.symlink(os.path.abspath(source), rundir.stage_dir(workdir, 1))
  t0 = time.time()
  stages = distill.run(config, workdir)
  record = {'arm': arm.name, 'seed': seed, 'overrides': arm.overrides, 'note': arm.note,
            'stage1_from': arm.stage1_from,
            'agreement_vs_ar': agreement_vs_ar(config, workdir),
            'seconds': time.time() - t0,
            'stages': {str(k): dict(result, curves=curves(rundir.stage_dir(workdir, k)))
                       for k, result in stages.items()}}
  progress.write_json(out_path, record)
  return record


def agreement_vs_ar(config, workdir: str) -> dict | None:
  """The widest student of a run against the AR teacher's own noise -> token map
  (agreement.measure; per slot and prefix, config.eval.agreement_batches held-out batches): the
  comparison across arms whose stages had different teachers. None without a student."""
  stages = [k for k, _ in distill.validate_schedule(config.distill.stages)
            if os.path.exists(rundir.eval_path(rundir.stage_dir(workdir, k)))]
  if not stages:
    return None
  k = max(stages)
  layout = sharding.single_device_layout()
  tokenizer = data.load_tokenizer(config)
  teacher = rundir.load_export(rundir.teacher_dir(workdir), layout, kind='ar', config=config)
  student = rundir.load_export(rundir.stage_dir(workdir, k), layout, kind='pflm', config=config)
  batch_at = distill.stage_batches(config, layout, k, 'validation', False,
                                   distill.VALIDATION_SEED_OFFSET, tokenizer)
  summary = agreement.measure(teacher, [student], layout,
                              (batch_at(i) for i in range(int(config.eval.agreement_batches))))[0]
  return {'k': k, 'windows': summary['windows'], 'slot': summary['slot'],
          'prefix': summary['prefix']}


def claim(workdir: str) -> bool:
  """Take a run for this process (several workers may share one study): False when a live
  process holds it. A claim of a dead process is taken over (its run resumes)."""
  path = os.path.join(workdir, 'worker.pid')
  for _ in range(2):
    try:  # atomic: exactly one of two workers creates the file
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
      try:
        with open(path) as f:
          holder = int(f.read().strip() or 0)
      except FileNotFoundError:
        continue
      except ValueError:
        return False  # created by another worker that has not written its pid yet
      if holder == os.getpid():
        return True
      if holder:
        try:
          os.kill(holder, 0)
          return False
        except ProcessLookupError:
          pass
      try:
        os.remove(path)  # a dead (or unreadable) holder: take the run over
      except FileNotFoundError:
        pass
      continue
    with os.fdopen(fd, 'w') as f:
      f.write(str(os.getpid()))
    return True
  return False


def curves(stage_dir: str) -> dict:
  """{'train': {key: [[step, value], ...]}, 'validation': {...}} from a stage's metrics.jsonl."""
  out = {'train': {}, 'validation': {}}
  path = os.path.join(stage_dir, 'metrics.jsonl')
  if not os.path.exists(path):
    return out
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      step = row.pop('step')
      row.pop('time', None)
      for key, value in row.items():
        split, name = ('validation', key[4:]) if key.startswith('val_') else ('train', key)
        if isinstance(value, (int, float)):
          out[split].setdefault(name, []).append([step, value])
  return out


# ----------------------------------------------------------------------------- summary

def load_records(output: str) -> list[dict]:
  records = []
  for name in sorted(os.listdir(output)):
    if name.endswith('.json') and '__seed' in name:
      with open(os.path.join(output, name)) as f:
        records.append(json.load(f))
  return records


def _stat(values) -> str:
  values = np.asarray(values, float)
  if len(values) == 1:
    return f'{values[0]:.3f}'
  return f'{values.mean():.3f} [{values.min():.3f}, {values.max():.3f}]'


def summary_table(records: list[dict], arm_order: list[str] | None = None) -> str:
  """Markdown: per arm and stage, held-out acc_total and per-slot acc (mean [min, max] over
  seeds), the ignore-the-noise baseline, the widest student's per-slot agreement with the AR
  teacher's own map (mean over seeds; on its row only), the run's wall time (workers share the
  CPU, so it is not a speed measurement) and the arm's note (its overrides are in each run's JSON)."""
  by_arm: dict[str, list[dict]] = {}
  for r in records:
    by_arm.setdefault(r['arm'], []).append(r)
  names = [a for a in (arm_order or []) if a in by_arm] + sorted(set(by_arm) - set(arm_order or []))
  lines = ['| arm | stage k (steps) | seeds | acc_total held-out | per-slot acc | baseline | '
           'per-slot vs AR map | wall min / run | what |', '|---|---|---|---|---|---|---|---|---|']
  for name in names:
    runs = by_arm[name]
    for k in sorted({int(k) for r in runs for k in r['stages']}):
      stage = [r['stages'][str(k)] for r in runs if str(k) in r['stages']]
      slots = ' / '.join(f'{np.mean([s["acc"][i] for s in stage]):.3f}' for i in range(k))
      vs_ar = [r['agreement_vs_ar'] for r in runs
               if (r.get('agreement_vs_ar') or {}).get('k') == k]
      ar_slots = ' / '.join(f'{np.mean([a["slot"][i] for a in vs_ar]):.3f}'
                            for i in range(k)) if vs_ar else '-'
      lines.append(
          f'| {name} | {k} ({stage[0]["steps"]}) | {len(stage)} | '
          f'{_stat([s["acc_total"] for s in stage])} | {slots} | '
          f'{np.mean([s["baseline_acc_total"] for s in stage]):.3f} | {ar_slots} | '
          f'{np.mean([r["seconds"] for r in runs]) / 60:.1f} | {runs[0].get("note", "")} |')
  return '\n'.join(lines)


def plot_curves(records: list[dict], path: str) -> None:
  """One figure per arm: held-out acc_total vs step (solid) and train loss (dashed, right
  axis) for every stage and seed."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  stages = sorted({int(k) for r in records for k in r['stages']})
  fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.6), squeeze=False)
  for ax, k in zip(axes[0], stages):
    twin = ax.twinx()
    for i, r in enumerate(records):
      stage = r['stages'].get(str(k))
      if not stage:
        continue
      color = f'C{i % 10}'
      val = np.asarray(stage['curves']['validation'].get('acc_total', []), float).reshape(-1, 2)
      loss = np.asarray(stage['curves']['train'].get('loss', []), float).reshape(-1, 2)
      ax.plot(val[:, 0], val[:, 1], '-o', color=color, ms=3, label=f'seed {r["seed"]}')
      twin.plot(loss[:, 0], loss[:, 1], '--', color=color, alpha=0.4)
    ax.set_title(f'{records[0]["arm"]}: stage k={k}')
    ax.set_xlabel('step')
    ax.set_ylabel('held-out acc_total (solid)')
    twin.set_ylabel('train loss (dashed)')
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def summarize(output: str, arm_order: list[str] | None = None, header: str = '') -> str:
  records = load_records(output)
  if not records:
    raise FileNotFoundError(f'no study runs in {output}: run the study first.')
  table = summary_table(records, arm_order)
  os.makedirs(os.path.join(output, 'curves'), exist_ok=True)
  for arm in sorted({r['arm'] for r in records}):
    plot_curves([r for r in records if r['arm'] == arm],
                os.path.join(output, 'curves', f'{arm}.png'))
  text = (header + '\n\n' if header else '') + table + '\n'
  with open(os.path.join(output, 'SUMMARY.md'), 'w') as f:
    f.write(text)
  return text


def arms_of(config) -> list[Arm]:
  """config.study.arms, each (name, overrides, note[, stage1_from]), as Arms."""
  return [Arm(arm[0], dict(arm[1]), *arm[2:]) for arm in config.study.arms]


def arm_config(config, name: str, seed: int):
  """`config` with the overrides of its study arm `name` and `seed` (ValueError naming the
  arms when there is no such arm)."""
  arms = {a.name: a for a in arms_of(config)}
  if name not in arms:
    raise ValueError(f'study arm {name!r}: the config has {sorted(arms)}')
  return apply_overrides(config, arms[name].overrides, seed)


def finished_k1_run(config, workdir: str, arm: str = '', seed: int = 0):
  """The config of the run in `workdir` (`config`, with study arm `arm`'s overrides and `seed`
  when an arm is named), after checking that its stage k=1 finished (ValueError if not): what
  the benchmarks that probe a k=1 student start from."""
  if arm:
    config = arm_config(config, arm, seed)
  finished = rundir.eval_path(rundir.stage_dir(workdir, 1))
  if not os.path.exists(finished):
    raise ValueError(f'{workdir} has no finished stage k=1 ({finished} is missing).')
  return config


def run(config, workdir: str, *, output: str, arms: str = '', seeds: str = '') -> None:
  """Run the study of `config.study` (arms x seeds) over the teacher in `workdir`, then write
  SUMMARY.md and the curve plots. arms / seeds: comma lists selecting a subset ('' = all).
  Start it in several processes to share the runs between them (`claim`)."""
  study = config.study
  all_arms = arms_of(config)
  chosen = [a for a in arms.split(',') if a]
  unknown = sorted(set(chosen) - {a.name for a in all_arms})
  if unknown:
    raise ValueError(f'--arms: unknown arm(s) {unknown}; the study has '
                     f'{[a.name for a in all_arms]}.')
  selected = [a for a in all_arms if not chosen or a.name in chosen]
  for arm in selected:
    check_stage1_source(arm, all_arms)
  seed_list = [int(s) for s in seeds.split(',') if s] or list(study.seeds)
  base = copy.deepcopy(config)
  with base.unlocked():
    del base['study']
  os.makedirs(output, exist_ok=True)
  for arm in selected:
    for seed in seed_list:
      progress.log(f'[study] arm {arm.name} seed {seed}: {arm.overrides}')
      run_arm(base, arm, seed, workdir, output)
  progress.log('\n' + summarize(output, [a.name for a in all_arms], study.header))
