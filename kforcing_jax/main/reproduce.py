"""The paper's decoding protocol on exported checkpoints (kforcing_jax/reproduce.py):

  python -m kforcing_jax.main.reproduce --config=configs/lm1b_ar.py --ar=DIR --pflm=DIR
      --prefix_file=F.jsonl --out=OUTDIR [--config.reproduce.batch_size=64 ...]

The config names the task (tokenizer, total length, penalties); config.reproduce the protocol
settings (configs/paper_protocol.py). --mode=lossless (default config.decode.mode): the student
drafts, the AR model verifies."""

from absl import app, flags

from kforcing_jax import cli, config_checks, reproduce

_AR = flags.DEFINE_string('ar', None, 'Run directory with the AR model (its teacher export).')
_PFLM = flags.DEFINE_string('pflm', None, 'Run directory with student stages; the widest '
                            'decodes every K in config.reproduce.ks.')
_PREFIX_FILE = flags.DEFINE_string('prefix_file', None, 'JSON lines with a "prefix" field.')
_OUT = flags.DEFINE_string('out', None, 'Output directory.')
_MODE = flags.DEFINE_enum('mode', None, ['lossy', 'lossless'], 'Default config.decode.mode. '
                          'lossless: the --pflm student drafts K tokens, the --ar model '
                          'verifies them (rows lossless_k<K>: the AR model\'s samples).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cli.start()
  config_checks.check(cli.CONFIG.value)
  reproduce.run(cli.CONFIG.value, prefix_file=_PREFIX_FILE.value, out=_OUT.value, ar=_AR.value,
                pflm=_PFLM.value, mode=_MODE.value)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'prefix_file', 'out'])
  cli.run(main)
