"""Are the independent heads of `make compare` handicapped by their settings? Trains the k = 2
heads (one extra head: token t+2 from the teacher's hidden state at t) on a run's teacher with
the comparison's budget, over a grid of learning rates and teacher-sample pool sizes, and reports
each setting's held-out loss and top-1 accuracy beside the default's.

  python -m kforcing_jax.benchmarks.heads_settings --config=configs/shakespeare_tiny.py \
      --workdir=runs/demo --output=results/compare/heads_settings.json \
      --learning_rates=1e-3,3e-3,1e-2 --pool_samples=512,2048

Each setting trains into <scratch>/<setting>/ (its own run directory whose teacher/ links the
run's), resumable and skipped when done; the JSON holds every setting's eval.json.
"""

import os

from absl import flags

from kforcing_jax import cli, progress, rundir
from kforcing_jax.baselines import heads

_OUTPUT = flags.DEFINE_string('output', 'results/compare/heads_settings.json', 'Output JSON.')
_SCRATCH = flags.DEFINE_string('scratch', '/tmp/heads_settings', 'Where the settings train.')
_LRS = flags.DEFINE_list('learning_rates', ['1e-3', '3e-3', '1e-2'], 'Peak learning rates.')
_POOLS = flags.DEFINE_list('pool_samples', ['512', '2048'], 'Teacher completions in the pool.')


def run(config, workdir: str) -> None:
  teacher_dir = os.path.abspath(rundir.teacher_dir(workdir))
  rows = []
  for pool in [int(p) for p in _POOLS.value]:
    for lr in [float(x) for x in _LRS.value]:
      name = f'lr{lr:g}_pool{pool}'
      arm_workdir = os.path.join(_SCRATCH.value, name)
      os.makedirs(arm_workdir, exist_ok=True)
      link = rundir.teacher_dir(arm_workdir)
      if not os.path.exists(link):
        os.symlink(teacher_dir, link)
      arm = config.copy_and_resolve_references()
      arm.compare.heads.learning_rate = lr
      arm.compare.heads.pool_samples = pool
      progress.log(f'\n=== heads k=2: {name} ===')
      done = heads.run(arm, arm_workdir, 2)
      rows.append(dict(setting=name, learning_rate=lr, pool_samples=pool,
                       default=(lr == config.compare.heads.learning_rate
                                and pool == config.compare.heads.pool_samples), **done))
      progress.log(f'[heads_settings] {name}: held-out loss {done["val_loss_1"]:.3f}, '
                   f'top-1 {done["val_acc_1"]:.4f}')
  if progress.is_main_process():
    progress.write_json(_OUTPUT.value, dict(teacher=teacher_dir, k=2, settings=rows))
  progress.log(f'-> {_OUTPUT.value}')


if __name__ == '__main__':
  cli.main(run)
