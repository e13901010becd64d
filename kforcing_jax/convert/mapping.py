"""PyTorch tensors -> our parameter tree (layouts in models/backbone.py and models/pflm.py).

PyTorch Linear computes y = x W^T with W (out, in); our kernels are (in, ..., out). The fused
QKV rows are [Q heads | K heads | V heads], each head Dh consecutive rows, so its transpose
splits as (D, 3, H, Dh). The attention output projection's input columns are the heads
concatenated head-major, hence (H, Dh, D). Vocabulary padding rows/columns are zero; the
backbone masks ids >= the real vocabulary size, so they are never sampled.
"""

import numpy as np

from kforcing_jax.convert import layout


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  return np.concatenate([x, np.zeros((rows - x.shape[0],) + x.shape[1:], x.dtype)], axis=0)


def block_params(state: dict, i: int, dims: layout.Dims) -> dict:
  d, h, dh = dims.d_model, dims.num_heads, dims.head_dim
  p = f'blocks.{i}.'
  return {
      'norm1': state[p + 'norm1.weight'],
      'qkv': state[p + 'attn_qkv.weight'].reshape(3, h, dh, d).transpose(3, 0, 1, 2),
      'attn_out': state[p + 'attn_out.weight'].T.reshape(h, dh, d),
      'norm2': state[p + 'norm2.weight'],
      'mlp_in': state[p + 'mlp.0.weight'].T,
      'mlp_in_bias': state[p + 'mlp.0.bias'],
      'mlp_out': state[p + 'mlp.2.weight'].T,
      'mlp_out_bias': state[p + 'mlp.2.bias'],
  }


def backbone_params(state: dict, dims: layout.Dims, padded_vocab: int) -> dict:
  return {
      'embed': _pad_rows(state[layout.EMBEDDING], padded_vocab),
      'blocks': {i: block_params(state, i, dims) for i in range(dims.num_layers)},
      'norm_final': state['output_layer.norm_final.weight'],
      'head': _pad_rows(state['output_layer.linear.weight'], padded_vocab).T,
      'head_bias': _pad_rows(state['output_layer.linear.bias'], padded_vocab),
  }


def noise_encoder_params(state: dict) -> dict:
  """combined_proj's input columns are cos(u) | sin(u) | cos(tau) | sin(tau), the order of
  [sinusoidal_features(u) | sinusoidal_features(tau)] in models/pflm.py."""
  p = layout.NOISE_ENCODER
  return {
      'proj': state[p + 'combined_proj.weight'].T,
      'proj_bias': state[p + 'combined_proj.bias'],
      'norm_scale': state[p + 'norm.weight'],
      'norm_bias': state[p + 'norm.bias'],
      'mlp_in': state[p + 'mlp.0.weight'].T,
      'mlp_in_bias': state[p + 'mlp.0.bias'],
      'mlp_out': state[p + 'mlp.2.weight'].T,
      'mlp_out_bias': state[p + 'mlp.2.bias'],
  }


def to_params(state: dict, kind: str, dims: layout.Dims, padded_vocab: int) -> dict:
  """Our float32 parameter tree: the backbone for 'ar', {'backbone', 'noise_encoder'} for 'pflm'."""
  backbone = backbone_params(state, dims, padded_vocab)
  if kind == 'ar':
    return backbone
  return {'backbone': backbone, 'noise_encoder': noise_encoder_params(state)}
