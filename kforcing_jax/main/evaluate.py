"""Quality, speed and roofline of the AR teacher and every student of a run:
`python -m kforcing_jax.main.evaluate --config=configs/<name>.py --workdir=DIR [--force]
[--allow_stale] [--mode=lossy|lossless]`
writes DIR/report/ (results.json, REPORT.md, speedup.png, quality.png, frontier.png); skipped
when results.json exists (and its models and decode.mode are unchanged) unless --force; a stale
student stage is an error unless --allow_stale. --mode overrides config.decode.mode: both
report the lossy and the lossless rows; lossless gives the lossless rows every prompt."""

from absl import flags

from kforcing_jax import cli, evaluate

_FORCE = flags.DEFINE_bool('force', False, 'Re-run even if report/results.json exists.')
_ALLOW_STALE = flags.DEFINE_bool('allow_stale', False, 'Evaluate student stages distilled from '
                                 'a teacher or previous stage that has changed since (refused '
                                 'otherwise).')
_MODE = flags.DEFINE_enum('mode', None, ['lossy', 'lossless'], 'Default config.decode.mode; '
                          'lossless: the lossless rows use all eval.num_samples prompts '
                          '(lossy: eval.lossless_samples).')

if __name__ == '__main__':
  cli.main(evaluate.run, force=lambda: _FORCE.value, config_name=cli.config_file,
           allow_stale=lambda: _ALLOW_STALE.value, mode=lambda: _MODE.value)
