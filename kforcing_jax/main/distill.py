"""Progressive self-forcing distillation: `python -m kforcing_jax.main.distill
--config=configs/<name>.py --workdir=DIR [--stage=K]` runs every stage of
config.distill.stages (finished ones are skipped) or only stage K (re-run even if done)."""

from absl import flags

from kforcing_jax import cli, distill

_STAGE = flags.DEFINE_integer('stage', None, 'Run only the stage with this k.')

if __name__ == '__main__':
  cli.main(distill.run, lock_workdir=True, only_stage=lambda: _STAGE.value)
