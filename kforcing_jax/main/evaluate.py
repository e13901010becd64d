"""Quality, speed and roofline of the AR teacher and every student of a run:
`python -m kforcing_jax.main.evaluate --config=configs/<name>.py --workdir=DIR [--force]`
writes DIR/report/ (results.json, REPORT.md, speedup.png, quality.png); skipped when
results.json exists unless --force."""

from absl import flags

from kforcing_jax import cli, evaluate

_FORCE = flags.DEFINE_bool('force', False, 'Re-run even if report/results.json exists.')

if __name__ == '__main__':
  cli.main(evaluate.run, force=lambda: _FORCE.value, config_name=cli.config_file)
