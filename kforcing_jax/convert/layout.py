"""The authors' state-dict layout (METHOD.md s.6): key names and PyTorch shapes per dimension.

Shapes here are PyTorch's (Linear weights are (out, in)); `mapping` turns them into ours.
"""

import dataclasses
import math
import re

NOISE_ENCODER = 'noise_encoder.'
INV_FREQ = 'rotary_emb.inv_freq'
EMBEDDING = 'vocab_embed.embedding'
BUFFERS = (INV_FREQ,)  # stored in the file but recomputed, not parameters
_BLOCK_INDEX = re.compile(r'^blocks\.([0-9]+)\.')


@dataclasses.dataclass(frozen=True)
class Dims:
  vocab_size: int    # the checkpoint's own (unpadded) vocabulary
  d_model: int
  num_layers: int
  num_heads: int

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads


def backbone_shapes(dims: Dims) -> dict[str, tuple[int, ...]]:
  v, d, f = dims.vocab_size, dims.d_model, 4 * dims.d_model
  shapes = {EMBEDDING: (v, d), INV_FREQ: (dims.head_dim // 2,)}
  for i in range(dims.num_layers):
    shapes.update({
        f'blocks.{i}.norm1.weight': (d,),
        f'blocks.{i}.attn_qkv.weight': (3 * d, d),
        f'blocks.{i}.attn_out.weight': (d, d),
        f'blocks.{i}.norm2.weight': (d,),
        f'blocks.{i}.mlp.0.weight': (f, d),
        f'blocks.{i}.mlp.0.bias': (f,),
        f'blocks.{i}.mlp.2.weight': (d, f),
        f'blocks.{i}.mlp.2.bias': (d,),
    })
  shapes.update({'output_layer.norm_final.weight': (d,), 'output_layer.linear.weight': (v, d),
                 'output_layer.linear.bias': (v,)})
  return shapes


def noise_encoder_shapes(d_model: int) -> dict[str, tuple[int, ...]]:
  d, f = d_model, 4 * d_model
  return {f'{NOISE_ENCODER}{name}': shape for name, shape in {
      'combined_proj.weight': (d, 2 * d), 'combined_proj.bias': (d,),
      'norm.weight': (d,), 'norm.bias': (d,),
      'mlp.0.weight': (f, d), 'mlp.0.bias': (f,),
      'mlp.2.weight': (d, f), 'mlp.2.bias': (d,)}.items()}


def expected_shapes(kind: str, dims: Dims) -> dict[str, tuple[int, ...]]:
  """Every key of a `kind` ('ar' | 'pflm') checkpoint with these dims, and its shape."""
  shapes = backbone_shapes(dims)
  if kind == 'pflm':
    shapes.update(noise_encoder_shapes(dims.d_model))
  return shapes


def parameter_count(shapes: dict[str, tuple[int, ...]]) -> int:
  """Number of trained values (buffers such as inv_freq excluded)."""
  return sum(math.prod(s) for key, s in shapes.items() if key not in BUFFERS)


def num_blocks(keys) -> int:
  """1 + the highest blocks.{i} index: a gap then shows up as missing keys, not fewer layers."""
  indices = [int(m.group(1)) for m in map(_BLOCK_INDEX.match, keys) if m]
  return max(indices) + 1 if indices else 0


def has_noise_encoder(keys) -> bool:
  return any(key.startswith(NOISE_ENCODER) for key in keys)
