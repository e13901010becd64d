"""Convert one of the authors' PyTorch checkpoints into a run directory (kforcing_jax/convert):

  python -m kforcing_jax.main.convert --config=configs/lm1b_ar.py --src=F.ckpt|F.safetensors
      --dst=DIR [--kind=ar|pflm] [--k=4]

The config is the base of DIR/config.py; its model.vocab_size must be the checkpoint's, and
its mask_id and pad_vocab_to_multiple_of are used (override with --config.model.<field>=...)."""

from absl import app, flags

from kforcing_jax import cli, config_checks
from kforcing_jax.convert import importer

_SRC = flags.DEFINE_string('src', None, "The authors' checkpoint: a Lightning .ckpt (needs "
                           'requirements-convert.txt) or a .safetensors file.')
_DST = flags.DEFINE_string('dst', None, 'Run directory to write: the AR model or the stage K '
                           'student params, config.py, converted.json.')
_KIND = flags.DEFINE_enum('kind', None, ['ar', 'pflm'], 'Checkpoint kind; inferred from the '
                          'noise-encoder tensors when omitted, and checked against them when '
                          'given.')
_K = flags.DEFINE_integer('k', 4, 'PFLM only: the window k the student was distilled for (the '
                          'weights do not depend on it; it names its stage and its k_max).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cli.quiet_libraries()
  config_checks.check(cli.CONFIG.value)  # the base of DST/config.py, which later runs read
  importer.convert_checkpoint(_SRC.value, _DST.value, cli.CONFIG.value, cli.config_file(),
                              _KIND.value, _K.value)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'src', 'dst'])
  cli.run(main)
