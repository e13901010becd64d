"""Are the baselines of `make compare` handicapped by their settings? Trains one baseline on a
run's teacher at a grid of settings, each with the comparison's own budget rule, and reports
each setting's held-out figures beside the default's.

  # independent heads (k = 2: token t+2 from the teacher's hidden state at t): learning rate x
  # teacher-sample pool size; held-out loss and top-1, on each arm's own held-out rows and on
  # the largest pool's held-out rows (common to all arms)
  python -m kforcing_jax.benchmarks.baseline_settings --config=configs/shakespeare_tiny.py \
      --workdir=runs/paper_recipe --baseline=heads --output=results/compare/heads_settings.json \
      --learning_rates=1e-3,3e-3,1e-2 --pool_samples=512,2048,8192
  # the masked diffusion LM: from scratch vs from the teacher's weights, --steps each (0: the
  # comparison's budget); held-out ELBO ppl bound and masked-token accuracy
  python -m kforcing_jax.benchmarks.baseline_settings --config=configs/shakespeare_tiny.py \
      --workdir=runs/paper_recipe --baseline=mdlm --output=results/compare/mdlm_init.json

Each setting trains into <scratch>/<setting>/, a run directory of its own whose teacher/ links
the run's; resumable and skipped when done. The JSON holds every setting's eval.json; the
table beside it (<output> with .md) is the README's.
"""

import os

import numpy as np
from absl import flags

from kforcing_jax import cli, data, progress, rundir, sharding
from kforcing_jax.baselines import heads, mdlm

_BASELINE = flags.DEFINE_enum('baseline', 'heads', ['heads', 'mdlm'], 'Which baseline.')
_OUTPUT = flags.DEFINE_string('output', 'results/compare/heads_settings.json', 'Output JSON.')
_SCRATCH = flags.DEFINE_string('scratch', '/tmp/baseline_settings', 'Where the settings train.')
_LRS = flags.DEFINE_list('learning_rates', ['1e-3', '3e-3', '1e-2'], 'heads: peak learning rates.')
_POOLS = flags.DEFINE_list('pool_samples', ['512', '2048', '8192'],
                          'heads: teacher completions in the pool.')
_INITS = flags.DEFINE_list('inits', ['scratch', 'from_teacher'], 'mdlm: initialisations.')
_STEPS = flags.DEFINE_integer('steps', 0, 'mdlm: steps per setting (0: the comparison budget).')


def arm_workdir(scratch: str, name: str, teacher_dir: str) -> str:
  """<scratch>/<name>/, its teacher/ a link to the run's teacher."""
  directory = os.path.join(scratch, name)
  os.makedirs(directory, exist_ok=True)
  link = rundir.teacher_dir(directory)
  if not os.path.exists(link):
    os.symlink(teacher_dir, link)
  return directory


def heads_settings(config, teacher_dir: str) -> list[dict]:
  rows, workdirs = [], []
  for pool in [int(p) for p in _POOLS.value]:
    for lr in [float(x) for x in _LRS.value]:
      name = f'heads_lr{lr:g}_pool{pool}'
      arm = config.copy_and_resolve_references()
      arm.compare.heads.learning_rate = lr
      arm.compare.heads.pool_samples = pool
      progress.log(f'\n=== heads k=2: {name} ===')
      workdirs.append(arm_workdir(_SCRATCH.value, name, teacher_dir))
      done = heads.run(arm, workdirs[-1], 2)
      rows.append(dict(done, setting=name, learning_rate=lr, pool_samples=pool,
                       default=(lr == config.compare.heads.learning_rate
                                and pool == config.compare.heads.pool_samples)))
      progress.log(f'[baseline_settings] {name}: held-out loss {done["val_loss_1"]:.3f}, '
                   f'top-1 {done["val_acc_1"]:.4f}')
  return score_on_common_held_out(config, rows, workdirs)


def score_on_common_held_out(config, rows: list[dict], workdirs: list[str]) -> list[dict]:
  """Each arm's own held-out rows are the last 1/8 of its own pool, so arms with different pool
  sizes are scored on different samples. Pools are prefixes of one another (the same prompts
  and noise keys, chunk by chunk; checked here), so the held-out rows of the largest pool lie
  outside every arm's training rows: every arm is scored again on those ('common_*' keys)."""
  tokenizer = data.prepared_tokenizer(config)
  layout = sharding.layout_from_config(config)
  pools = [heads.read_pool(rundir.baseline_dir(w, heads.dir_name(2)))[0] for w in workdirs]
  largest = max(pools, key=len)
  for row, pool in zip(rows, pools):
    if not np.array_equal(pool, largest[:len(pool)]):
      raise ValueError(f'{row["setting"]}: its pool is not a prefix of the largest pool, so '
                       'the largest pool\'s held-out rows may be in its training rows.')
  _, held_out = heads.split_pool(largest)
  # every arm's teacher/ links the same teacher: one load, one compiled scorer for all arms
  teacher = rundir.load_export(rundir.teacher_dir(workdirs[0]), layout, kind='ar',
                               config=config, tokenizer=tokenizer)
  score = heads.make_eval_fn(teacher.model, teacher.params, layout, held_out,
                             config.compare.heads.batch_size, config.decode.prefix_len)
  for row, workdir in zip(rows, workdirs):
    _, params = heads.load(config, workdir, 2, layout, tokenizer)
    got = score({'params': params})
    row.update(common_val_loss_1=got['val_loss_1'], common_val_acc_1=got['val_acc_1'],
               common_held_out=int(held_out.shape[0]))
    progress.log(f'[baseline_settings] {row["setting"]} on the common {held_out.shape[0]} '
                 f'held-out completions: loss {got["val_loss_1"]:.3f}, top-1 '
                 f'{got["val_acc_1"]:.4f}')
  return rows


def mdlm_settings(config, teacher_dir: str) -> list[dict]:
  rows = []
  for init in _INITS.value:
    name = f'mdlm_{init}_steps{_STEPS.value or "budget"}'
    arm = config.copy_and_resolve_references()
    arm.compare.mdlm.init = init
    arm.compare.mdlm.steps = _STEPS.value
    progress.log(f'\n=== mdlm: {name} ===')
    done = mdlm.run(arm, arm_workdir(_SCRATCH.value, name, teacher_dir))
    rows.append(dict(done, setting=name, init=init, default=init == config.compare.mdlm.init))
    progress.log(f'[baseline_settings] {name}: ELBO ppl bound {done["val_ppl_bound"]:.1f}')
  return rows


def markdown(baseline: str, rows: list[dict]) -> str:
  """The grid as a Markdown table, the default setting marked."""
  if baseline == 'heads':
    lines = ['| learning rate | pool (held out) | own held-out loss | own top-1 | loss on the '
             'common held-out | top-1 on the common held-out | wall min |',
             '|---|---|---|---|---|---|---|']
    for r in rows:
      mark = ' (default)' if r['default'] else ''
      lines.append(f'| {r["learning_rate"]:g}{mark} | {r["pool_samples"]} ({r["held_out"]}) | '
                   f'{r["val_loss_1"]:.3f} | {r["val_acc_1"]:.4f} | '
                   f'{r["common_val_loss_1"]:.3f} | {r["common_val_acc_1"]:.4f} | '
                   f'{r["seconds"] / 60:.1f} |')
  else:
    lines = ['| init | steps | held-out ELBO ppl bound | masked-token top-1 at 15% / 50% / 90% '
             'masked | wall min |', '|---|---|---|---|---|']
    for r in rows:
      mark = ' (default)' if r['default'] else ''
      accs = ' / '.join(f'{r[f"val_masked_acc_{m}"]:.4f}' for m in ('0.15', '0.5', '0.9'))
      lines.append(f'| {r["init"]}{mark} | {r["train_steps"]} | {r["val_ppl_bound"]:.1f} | '
                   f'{accs} | {r["seconds"] / 60:.1f} |')
  return '\n'.join(lines) + '\n'


def run(config, workdir: str) -> None:
  teacher_dir = os.path.abspath(rundir.teacher_dir(workdir))
  settings = heads_settings if _BASELINE.value == 'heads' else mdlm_settings
  rows = settings(config, teacher_dir)
  table = markdown(_BASELINE.value, rows)
  if progress.is_main_process():
    progress.write_json(_OUTPUT.value, dict(baseline=_BASELINE.value, teacher=teacher_dir,
                                            settings=rows))
    with open(os.path.splitext(_OUTPUT.value)[0] + '.md', 'w') as f:
      f.write(table)
  progress.log(f'{table}-> {_OUTPUT.value} (and .md)')


if __name__ == '__main__':
  cli.main(run)
