"""Strict checks of a stripped state dict: infer the dimensions, then demand exactly the
documented keys with exactly the implied shapes and our RoPE frequencies.

The authors' own loader ignores missing keys (leaving, e.g., a zero output head); here every
missing and every unexpected key is named and the conversion stops.
"""

import numpy as np

from kforcing_jax.convert import errors, layout
from kforcing_jax.models import KINDS
from kforcing_jax.models.attention import rope_inverse_frequencies

# float32 buffers of the same formula agree to a few ulps; a different base or head dim is off
# by far more than this
INV_FREQ_RTOL = 1e-5


def infer_dims(state: dict) -> layout.Dims:
  """V, D from the embedding; Dh = 2 * len(inv_freq), H = D / Dh; L from the block indices."""
  anchors = [layout.EMBEDDING, layout.INV_FREQ]
  absent = [key for key in anchors if key not in state]
  if absent:
    raise errors.MissingKeysError(f'missing {errors.name_keys(absent)}: the model dimensions '
                                  'are read from these, so nothing can be checked without them.')
  embedding, inv_freq = state[layout.EMBEDDING], state[layout.INV_FREQ]
  if embedding.ndim != 2 or inv_freq.ndim != 1 or not inv_freq.size:
    raise errors.ShapeMismatchError(
        f'{layout.EMBEDDING} has shape {embedding.shape} (expected (V, D)) and '
        f'{layout.INV_FREQ} {inv_freq.shape} (expected (head_dim / 2,)).')
  vocab_size, d_model = embedding.shape
  head_dim = 2 * inv_freq.shape[0]
  if d_model % head_dim:
    raise errors.ShapeMismatchError(
        f'{layout.INV_FREQ} has {inv_freq.shape[0]} entries, so head_dim = {head_dim}, which '
        f'does not divide d_model = {d_model} (from {layout.EMBEDDING}).')
  num_layers = layout.num_blocks(state)
  if not num_layers:
    raise errors.MissingKeysError('no blocks.{i}.* tensors: the checkpoint has no layers.')
  return layout.Dims(vocab_size, d_model, num_layers, d_model // head_dim)


def resolve_kind(state: dict, requested: str | None) -> str:
  found = 'pflm' if layout.has_noise_encoder(state) else 'ar'
  if requested is None:
    return found
  if requested not in KINDS:
    raise errors.KindMismatchError(f'--kind={requested!r}: expected one of {KINDS}.')
  if requested != found:
    has = 'has' if found == 'pflm' else 'has no'
    raise errors.KindMismatchError(
        f'--kind={requested} but the checkpoint {has} {layout.NOISE_ENCODER}* tensors, so it '
        f'is a {found} checkpoint; drop --kind or pass --kind={found}.')
  return requested


def check_keys(state: dict, expected: dict) -> None:
  missing = set(expected) - set(state)
  unexpected = set(state) - set(expected)
  extra = f'; unexpected: {errors.name_keys(unexpected)}' if unexpected else ''
  if missing:
    raise errors.MissingKeysError(f'missing {len(missing)} tensor(s): '
                                  f'{errors.name_keys(missing)}{extra}')
  if unexpected:
    raise errors.UnexpectedKeysError(f'{len(unexpected)} unexpected tensor(s): '
                                     f'{errors.name_keys(unexpected)}')


def check_shapes(state: dict, expected: dict, dims: layout.Dims) -> None:
  wrong = [f'{key} {tuple(state[key].shape)} (expected {shape})'
           for key, shape in sorted(expected.items()) if tuple(state[key].shape) != shape]
  if wrong:
    raise errors.ShapeMismatchError(
        f'shapes disagree with V={dims.vocab_size}, D={dims.d_model}, L={dims.num_layers}, '
        f'H={dims.num_heads}: {errors.name_keys(wrong)}')


def check_inv_freq(state: dict, dims: layout.Dims) -> None:
  ours = np.asarray(rope_inverse_frequencies(dims.head_dim))
  stored = state[layout.INV_FREQ]
  if not np.allclose(stored, ours, rtol=INV_FREQ_RTOL, atol=0.0):
    worst = int(np.argmax(np.abs(stored - ours) / ours))
    raise errors.InvFreqMismatchError(
        f'{layout.INV_FREQ}[{worst}] = {stored[worst]:.8g} but our RoPE (base 10000, head_dim '
        f'{dims.head_dim}) uses {ours[worst]:.8g}: a different RoPE base or head split.')


def check_state_dict(state: dict, requested_kind: str | None = None):
  """Returns (kind, dims) of a checkpoint that passes every check; raises a named error else."""
  dims = infer_dims(state)
  kind = resolve_kind(state, requested_kind)
  expected = layout.expected_shapes(kind, dims)
  check_keys(state, expected)
  check_shapes(state, expected, dims)
  check_inv_freq(state, dims)
  return kind, dims
