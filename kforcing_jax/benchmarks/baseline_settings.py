"""Are the baselines of `make compare` handicapped by their settings? Trains one baseline on a
run's teacher at a grid of settings, each with the comparison's own budget rule, and reports
each setting's held-out figures beside the default's.

  # independent heads (k = 2: token t+2 from the teacher's hidden state at t): learning rate x
  # teacher-sample pool size; held-out loss and top-1
  python -m kforcing_jax.benchmarks.baseline_settings --config=configs/shakespeare_tiny.py \
      --workdir=runs/demo --baseline=heads --output=results/compare/heads_settings.json \
      --learning_rates=1e-3,3e-3,1e-2 --pool_samples=512,2048
  # the masked diffusion LM: from scratch vs from the teacher's weights, --steps each (0: the
  # comparison's budget); held-out ELBO ppl bound and masked-token accuracy
  python -m kforcing_jax.benchmarks.baseline_settings --config=configs/shakespeare_tiny.py \
      --workdir=runs/demo --baseline=mdlm --output=results/compare/mdlm_init.json --steps=150

Each setting trains into <scratch>/<setting>/, a run directory of its own whose teacher/ links
the run's; resumable and skipped when done. The JSON holds every setting's eval.json.
"""

import os

from absl import flags

from kforcing_jax import cli, progress, rundir
from kforcing_jax.baselines import heads, mdlm

_BASELINE = flags.DEFINE_enum('baseline', 'heads', ['heads', 'mdlm'], 'Which baseline.')
_OUTPUT = flags.DEFINE_string('output', 'results/compare/heads_settings.json', 'Output JSON.')
_SCRATCH = flags.DEFINE_string('scratch', '/tmp/baseline_settings', 'Where the settings train.')
_LRS = flags.DEFINE_list('learning_rates', ['1e-3', '3e-3', '1e-2'], 'heads: peak learning rates.')
_POOLS = flags.DEFINE_list('pool_samples', ['512', '2048'], 'heads: teacher completions in the pool.')
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
  rows = []
  for pool in [int(p) for p in _POOLS.value]:
    for lr in [float(x) for x in _LRS.value]:
      name = f'heads_lr{lr:g}_pool{pool}'
      arm = config.copy_and_resolve_references()
      arm.compare.heads.learning_rate = lr
      arm.compare.heads.pool_samples = pool
      progress.log(f'\n=== heads k=2: {name} ===')
      done = heads.run(arm, arm_workdir(_SCRATCH.value, name, teacher_dir), 2)
      rows.append(dict(done, setting=name, learning_rate=lr, pool_samples=pool,
                       default=(lr == config.compare.heads.learning_rate
                                and pool == config.compare.heads.pool_samples)))
      progress.log(f'[baseline_settings] {name}: held-out loss {done["val_loss_1"]:.3f}, '
                   f'top-1 {done["val_acc_1"]:.4f}')
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


def run(config, workdir: str) -> None:
  teacher_dir = os.path.abspath(rundir.teacher_dir(workdir))
  settings = heads_settings if _BASELINE.value == 'heads' else mdlm_settings
  rows = settings(config, teacher_dir)
  if progress.is_main_process():
    progress.write_json(_OUTPUT.value, dict(baseline=_BASELINE.value, teacher=teacher_dir,
                                            settings=rows))
  progress.log(f'-> {_OUTPUT.value}')


if __name__ == '__main__':
  cli.main(run)
