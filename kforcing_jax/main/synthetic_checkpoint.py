"""A random checkpoint in the authors' exact format (kforcing_jax/convert/synthetic.py), so the
converter's commands run without the released files:

  python -m kforcing_jax.main.synthetic_checkpoint --dst=F.safetensors|F.ckpt --kind=ar|pflm
      --vocab_size=V --d_model=D --num_layers=L --num_heads=H --seed=S"""

from absl import app, flags

from kforcing_jax import cli
from kforcing_jax.convert import layout, synthetic

_DST = flags.DEFINE_string('dst', None, 'Output file: .ckpt (torch pickle) or .safetensors.')
_KIND = flags.DEFINE_enum('kind', 'ar', ['ar', 'pflm'], 'AR teacher or PFLM student keys.')
_VOCAB_SIZE = flags.DEFINE_integer('vocab_size', 256, 'V.')
_D_MODEL = flags.DEFINE_integer('d_model', 64, 'D.')
_NUM_LAYERS = flags.DEFINE_integer('num_layers', 2, 'L.')
_NUM_HEADS = flags.DEFINE_integer('num_heads', 4, 'H.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the random values.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  dims = layout.Dims(_VOCAB_SIZE.value, _D_MODEL.value, _NUM_LAYERS.value, _NUM_HEADS.value)
  print(synthetic.write_random(_DST.value, _KIND.value, dims, _SEED.value), flush=True)


if __name__ == '__main__':
  flags.mark_flags_as_required(['dst'])
  cli.run(main)
