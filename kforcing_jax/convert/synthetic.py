"""Random checkpoints in the authors' format: exactly the documented keys and PyTorch shapes.

`python -m kforcing_jax.main.synthetic_checkpoint --dst=F.safetensors|F.ckpt --kind=ar|pflm
--vocab_size=V --d_model=D --num_layers=L --num_heads=H --seed=S` writes one, so the
converter's commands and tests run without the released files. .ckpt is a Lightning-style
torch pickle {'state_dict': {'backbone.' + key: tensor}} (needs requirements-convert.txt);
.safetensors holds the same prefixed keys as numpy arrays.
"""

import os

import numpy as np

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


def write_random(path: str, kind: str, dims: layout.Dims, seed: int) -> str:
  """Writes a random `kind` checkpoint with `dims` to `path`; returns a one-line summary."""
  state = random_state_dict(kind, dims, seed)
  write_checkpoint(path, state)
  return (f'wrote {path}: {kind}, {len(state)} tensors, '
          f'{layout.parameter_count(layout.expected_shapes(kind, dims)):,} params')
