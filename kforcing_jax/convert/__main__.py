"""python -m kforcing_jax.convert --src=FILE.ckpt|FILE.safetensors --dst=DIR [--kind=ar|pflm]
[--k=4] [--pad_vocab_to_multiple_of=128] [--mask_id=ID]"""

from absl import flags

from kforcing_jax import cli
from kforcing_jax.convert import importer

_SRC = flags.DEFINE_string('src', None, "The authors' checkpoint: a Lightning .ckpt (needs "
                           'requirements-convert.txt) or a .safetensors file.')
_DST = flags.DEFINE_string('dst', None, 'Run directory to write: teacher/params (AR) or '
                           'student_k{K}/params (PFLM), config.py, converted.json.')
_KIND = flags.DEFINE_enum('kind', None, ['ar', 'pflm'], 'Checkpoint kind; inferred from the '
                          'noise-encoder tensors when omitted, and checked against them when '
                          'given.')
_K = flags.DEFINE_integer('k', 4, 'PFLM only: the window k the student was distilled for (the '
                          "weights do not depend on it; it names student_k{K} and its k_max).")
_PAD = flags.DEFINE_integer('pad_vocab_to_multiple_of', 128, 'Pad the vocabulary (zero rows, '
                            'never sampled) to a multiple of this, so it divides the mesh.')
_MASK_ID = flags.DEFINE_integer('mask_id', None, 'Reserved mask id (never sampled). Default: 103 '
                                'for V=30522, 50257 for V=50258; required for other sizes.')


def main(argv):
  del argv
  cli.quiet_libraries()
  importer.convert_checkpoint(_SRC.value, _DST.value, _KIND.value, _K.value, _PAD.value,
                              _MASK_ID.value)


if __name__ == '__main__':
  flags.mark_flags_as_required(['src', 'dst'])
  cli.run(main)
