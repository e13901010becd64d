"""The distillation-recipe study: `python -m kforcing_jax.main.distill_study
--config=configs/distill_study.py --workdir=runs/demo --output=results/distill_study
[--arms=a,b] [--seeds=0,1]`. --workdir holds the trained AR teacher (teacher/); every arm x seed
distils into <output>/runs/ and leaves <output>/<arm>__seed<S>.json; SUMMARY.md and
curves/<arm>.png are rewritten at the end."""

from absl import flags

from kforcing_jax import cli, study

_OUTPUT = flags.DEFINE_string('output', 'results/distill_study', 'Where the study is written.')
_ARMS = flags.DEFINE_string('arms', '', 'Comma-separated arm names (default: all).')
_SEEDS = flags.DEFINE_string('seeds', '', 'Comma-separated seeds (default: config.study.seeds).')

if __name__ == '__main__':
  cli.main(study.run, output=lambda: _OUTPUT.value, arms=lambda: _ARMS.value,
           seeds=lambda: _SEEDS.value)
