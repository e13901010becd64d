"""Random checkpoints in the authors' format: exactly the documented keys and PyTorch shapes.

`python -m kforcing_jax.convert.synthetic --dst=F.safetensors|F.ckpt --kind=ar|pflm
--vocab_size=V --d_model=D --num_layers=L --num_heads=H --seed=S` writes one, so the
converter's commands and tests run without the released files. .ckpt is a Lightning-style
torch pickle {'state_dict': {'backbone.' + key: tensor}} (needs requirements-convert.txt);
.safetensors holds the same prefixed keys as numpy arrays.
"""

import os

import numpy as np
from absl import flags

from kforcing_jax import cli
from kforcing_jax.convert import errors, layout, reader


def rope_inv_freq(head_dim: int) -> np.ndarray:
  """The buffer as a PyTorch rotary embedding stores it: 1 / 10000^(arange(0, Dh, 2) / Dh)."""
  return (1.0 / 10000.0 ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)).astype(
      np.float32)


def random_state_dict(kind: str, dims: layout.Dims, seed: int) -> dict[str, np.ndarray]:
  """Unprefixed keys -> float32 arrays. LayerNorm scales and biases are random too (not 1/0),
  so a converter that drops or misplaces one changes the logits; the embedding has a GPT-style
  std of 0.02, small enough that LayerNorm's eps (1e-5 against a variance of 4e-4) matters."""
  if dims.d_model % dims.num_heads or dims.head_dim % 2:
    raise ValueError(f'd_model={dims.d_model} / num_heads={dims.num_heads} must be an even '
                     'integer head dim (RoPE rotates pairs).')
  rng = np.random.default_rng(seed)
  state = {}
  for key, shape in layout.expected_shapes(kind, dims).items():
    if key == layout.INV_FREQ:
      value = rope_inv_freq(dims.head_dim)
    elif key == layout.EMBEDDING:
      value = 0.02 * rng.standard_normal(shape)
    elif key.endswith(('norm.weight', 'norm1.weight', 'norm2.weight', 'norm_final.weight')):
      value = 1.0 + 0.2 * rng.standard_normal(shape)
    elif key.endswith('bias'):
      value = 0.1 * rng.standard_normal(shape)
    else:  # a Linear weight (out, in)
      value = rng.standard_normal(shape) / np.sqrt(shape[1])
    state[key] = np.asarray(value, np.float32)
  return state


def write_checkpoint(path: str, state: dict[str, np.ndarray]) -> None:
  prefixed = {reader.PREFIX + key: value for key, value in state.items()}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if path.endswith('.ckpt'):
    try:
      import torch  # optional: only the .ckpt format needs it
    except ImportError as e:
      raise errors.ConversionError('writing a .ckpt needs PyTorch: pip install -r '
                                   'requirements-convert.txt, or write a .safetensors file.') from e
    torch.save({'state_dict': {key: torch.from_numpy(value) for key, value in prefixed.items()}},
               path)
  elif path.endswith('.safetensors'):
    from safetensors.numpy import save_file
    save_file(prefixed, path)
  else:
    raise errors.ConversionError(f'{path}: write a .ckpt or a .safetensors file.')


def define_flags():
  """Defined only when run as a script: importing this module (the tests do, beside
  generate.py's --seed) must not register flags."""
  return {
      'dst': flags.DEFINE_string('dst', None, 'Output file: .ckpt (torch pickle) or '
                                 '.safetensors.'),
      'kind': flags.DEFINE_enum('kind', 'ar', ['ar', 'pflm'], 'AR teacher or PFLM student keys.'),
      'vocab_size': flags.DEFINE_integer('vocab_size', 256, 'V.'),
      'd_model': flags.DEFINE_integer('d_model', 64, 'D.'),
      'num_layers': flags.DEFINE_integer('num_layers', 2, 'L.'),
      'num_heads': flags.DEFINE_integer('num_heads', 4, 'H.'),
      'seed': flags.DEFINE_integer('seed', 0, 'Seed of the random values.'),
  }


def main(flag_values):
  values = {name: flag.value for name, flag in flag_values.items()}
  dims = layout.Dims(values['vocab_size'], values['d_model'], values['num_layers'],
                     values['num_heads'])
  state = random_state_dict(values['kind'], dims, values['seed'])
  write_checkpoint(values['dst'], state)
  print(f'wrote {values["dst"]}: {values["kind"]}, {len(state)} tensors, '
        f'{layout.parameter_count(layout.expected_shapes(values["kind"], dims)):,} params')


if __name__ == '__main__':
  _FLAGS = define_flags()
  flags.mark_flags_as_required(['dst'])
  cli.run(lambda argv: main(_FLAGS))
