"""Read the authors' checkpoint files into {key: float32 numpy array}, `backbone.` stripped.

.ckpt: a PyTorch Lightning pickle (needs torch, see requirements-convert.txt); these files are
trusted, so torch.load runs with weights_only=False. .safetensors: read with numpy only.
"""

import os

import numpy as np

from kforcing_jax.convert import errors

PREFIX = 'backbone.'
FORMATS = ('.ckpt', '.safetensors')


def _load_ckpt(path: str) -> dict:
  try:
    import torch  # only .ckpt needs it, and it is a large optional install
  except ImportError as e:
    raise errors.ConversionError(
        f'reading {path} needs PyTorch: pip install -r requirements-convert.txt (or convert a '
        '.safetensors file, which needs no torch).') from e
  checkpoint = torch.load(path, map_location='cpu', weights_only=False)
  if not isinstance(checkpoint, dict) or 'state_dict' not in checkpoint:
    found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
    raise errors.ConversionError(f'{path} is not a Lightning checkpoint: no "state_dict" entry '
                                 f'(found {found}).')
  state = {}
  for key, value in checkpoint['state_dict'].items():
    if not isinstance(value, torch.Tensor):
      raise errors.ConversionError(f'{path}: state_dict entry {key} is a '
                                   f'{type(value).__name__}, not a tensor.')
    state[key] = value.detach().to(torch.float32).numpy()
  return state


def _load_safetensors(path: str) -> dict:
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  try:
    return load_file(path)
  except SafetensorError as e:  # a damaged header or a truncated file
    raise errors.ConversionError(f'{path} is not a readable .safetensors file ({e}); it may be '
                                 'truncated or damaged: copy or download it again.') from None


def strip_prefix(state: dict) -> dict:
  """Drop the `backbone.` prefix; a name present both with and without it is ambiguous."""
  out = {}
  for key, value in state.items():
    name = key[len(PREFIX):] if key.startswith(PREFIX) else key
    if name in out:
      raise errors.UnexpectedKeysError(f'{name} appears both with and without the "{PREFIX}" '
                                       'prefix; which one to use is ambiguous.')
    out[name] = value
  return out


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no checkpoint file at {path}.')
  suffix = os.path.splitext(path)[1]
  if suffix not in FORMATS:
    raise errors.ConversionError(f'{path}: unknown checkpoint format {suffix!r}; expected one '
                                 f'of {", ".join(FORMATS)}.')
  state = _load_ckpt(path) if suffix == '.ckpt' else _load_safetensors(path)
  return {key: np.asarray(value, np.float32) for key, value in strip_prefix(state).items()}
