"""The pre-norm causal decoder shared by the AR teacher and the PFLM student (METHOD.md s.2).

Parameters are `nnx.Param`s tagged with `logical_axes`; `kforcing_jax.sharding` maps those
names to mesh axes. The module is split once (see `models/__init__.py`) and only ever called
inside pure jitted functions via `nnx.merge(graphdef, params)`.

Layouts (chosen so sharding and the PyTorch converter are both simple):
  embed        (V, D)           ('vocab', 'embed')
  qkv          (D, 3, H, Dh)    ('embed', None, 'heads', 'head_dim')   Q|K|V, head-major
  (grouped-query attention, num_kv_heads = Hkv < H, instead of qkv:)
  q            (D, H, Dh)       ('embed', 'heads', 'head_dim')
  kv           (D, 2, Hkv, Dh)  ('embed', None, 'heads', 'head_dim')   K|V; the cache is Hkv wide
  attn_out     (H, Dh, D)       ('heads', 'head_dim', 'embed')
  mlp_in       (D, 4D) + bias   ('embed', 'mlp')
  mlp_out      (4D, D) + bias   ('mlp', 'embed')
  head         (D, V) + bias    ('embed', 'vocab'), zero-initialised
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from kforcing_jax import sharding
from kforcing_jax.models import attention

LN_EPS = 1e-5
MASKED_LOGIT = -1000.0

# Layer rematerialisation for the training forwards (config.model.remat): which values of a
# layer the backward pass keeps; everything else is recomputed from the layer's input. 'full'
# keeps only the input, so a layer's attention scores and MLP activations never outlive its
# forward; 'dots' also keeps the matmul outputs without batch dims (less recompute, more memory).
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
  vocab_size: int          # padded size: the embedding / head rows
  num_real_tokens: int     # ids >= this are padding added for sharding, never sampled
  mask_id: int             # reserved mask/pad id, never sampled
  d_model: int
  num_layers: int
  num_heads: int
  mlp_ratio: int = 4
  # grouped-query attention: K/V heads, each shared by num_heads / num_kv_heads query heads
  # (0 = num_heads: multi-head attention, the paper's and the released checkpoints')
  num_kv_heads: int = 0
  rope_base: float = 10000.0
  dtype: str = 'float32'   # compute dtype; parameters stay float32
  remat: str = 'none'      # a REMAT_POLICIES key; changes memory and FLOPs, never the values
  # the noise -> token map (sampling.CDF_ORDERS): the AR decoder samples with it and students
  # are distilled on it; a student must be decoded and scored with the order it learned
  cdf_order: str = 'id'
  # the student's noise encoder reads phi(noise_scale * u): 1 is the authors' encoder
  noise_scale: float = 1.0
  # how a student turns a slot's logits into its token (sampling.READOUTS): 'argmax' (the
  # paper's) or 'inverse_cdf' (the slot's distribution sampled with the slot's own noise)
  readout: str = 'argmax'
  # a student's slots 2..k read the tokens of the slots before them (models/pflm.py,
  # `PushForwardLM.slot_readout`): one extra block per later slot; False is the paper's student
  token_feedback: bool = False

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def kv_heads(self) -> int:
    """K/V heads: num_kv_heads, or num_heads when that is 0."""
    return self.num_kv_heads or self.num_heads

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)


def rematerialized(cfg: BackboneConfig, layer_fn):
  """`layer_fn` under jax.checkpoint with the config's policy ('none': unchanged).

  Only matters under differentiation: the frozen teachers and the decode loops run the same
  wrapped layers at no extra cost.
  """
  if cfg.remat == 'none':
    return layer_fn
  return jax.checkpoint(layer_fn, policy=REMAT_POLICIES[cfg.remat])


def _param(rngs, shape, std, axes):
  """A float32 N(0, std^2) parameter tagged with its logical axis names."""
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32), logical_axes=axes)


def layer_norm(x, scale, bias=None, eps=LN_EPS):
  """LayerNorm in float32, cast back to x's dtype."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps) * scale
  if bias is not None:
    y = y + bias
  return y.astype(x.dtype)


class Block(nnx.Module):
  """LN -> QKV -> RoPE -> attention -> out proj -> residual; LN -> tanh-GELU MLP -> residual."""

  def __init__(self, cfg: BackboneConfig, rngs: nnx.Rngs):
    d, h, dh, f = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.mlp_ratio * cfg.d_model
    self.cfg = cfg
    self.norm1 = nnx.Param(jnp.ones((d,)), logical_axes=('embed',))
    if cfg.kv_heads == h:
      self.qkv = _param(rngs, (d, 3, h, dh), d ** -0.5, ('embed', None, 'heads', 'head_dim'))
    else:
      self.q = _param(rngs, (d, h, dh), d ** -0.5, ('embed', 'heads', 'head_dim'))
      self.kv = _param(rngs, (d, 2, cfg.kv_heads, dh), d ** -0.5,
                       ('embed', None, 'heads', 'head_dim'))
    self.attn_out = _param(rngs, (h, dh, d), d ** -0.5 / (2 * cfg.num_layers) ** 0.5,
                           ('heads', 'head_dim', 'embed'))
    self.norm2 = nnx.Param(jnp.ones((d,)), logical_axes=('embed',))
    self.mlp_in = _param(rngs, (d, f), d ** -0.5, ('embed', 'mlp'))
    self.mlp_in_bias = nnx.Param(jnp.zeros((f,)), logical_axes=('mlp',))
    self.mlp_out = _param(rngs, (f, d), f ** -0.5 / (2 * cfg.num_layers) ** 0.5, ('mlp', 'embed'))
    self.mlp_out_bias = nnx.Param(jnp.zeros((d,)), logical_axes=('embed',))

  def _cast(self, p):
    return p[...].astype(self.cfg.compute_dtype)

  def project_qkv(self, x, positions):
    """x: (..., D) -> q (..., H, Dh), k and v (..., Hkv, Dh), RoPE applied to q and k."""
    h = layer_norm(x, self.norm1[...])
    if self.cfg.kv_heads == self.cfg.num_heads:
      qkv = jnp.einsum('...d,dzhe->...zhe', h, self._cast(self.qkv))
      q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    else:
      q = jnp.einsum('...d,dhe->...he', h, self._cast(self.q))
      kv = jnp.einsum('...d,dzhe->...zhe', h, self._cast(self.kv))
      k, v = kv[..., 0, :, :], kv[..., 1, :, :]
    q = attention.apply_rope(q, positions, self.cfg.rope_base)
    k = attention.apply_rope(k, positions, self.cfg.rope_base)
    return q, k, v

  def finish(self, x, attn):
    """Output projection, residual, MLP, residual."""
    x = x + jnp.einsum('...hd,hde->...e', attn, self._cast(self.attn_out))
    h = layer_norm(x, self.norm2[...])
    h = jnp.einsum('...d,df->...f', h, self._cast(self.mlp_in)) + self._cast(self.mlp_in_bias)
    h = jax.nn.gelu(h, approximate=True)
    h = jnp.einsum('...f,fd->...d', h, self._cast(self.mlp_out)) + self._cast(self.mlp_out_bias)
    return x + h


class Backbone(nnx.Module):
  """Token embedding, L blocks, final LN and the untied output head."""

  def __init__(self, cfg: BackboneConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), 0.02, ('vocab', 'embed'))
    self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
    self.norm_final = nnx.Param(jnp.ones((cfg.d_model,)), logical_axes=('embed',))
    self.head = nnx.Param(jnp.zeros((cfg.d_model, cfg.vocab_size)), logical_axes=('embed', 'vocab'))
    self.head_bias = nnx.Param(jnp.zeros((cfg.vocab_size,)), logical_axes=('vocab',))

  def embed_tokens(self, tokens):
    x = jnp.take(self.embed[...], tokens, axis=0).astype(self.cfg.compute_dtype)
    return sharding.constrain(x, ('batch',) + (None,) * (x.ndim - 2) + ('embed',))

  def logits(self, x):
    """Final LN + head in float32; mask id and vocabulary padding forced to -1000."""
    h = layer_norm(x, self.norm_final[...]).astype(jnp.float32)
    logits = jnp.einsum('...d,dv->...v', h, self.head[...]) + self.head_bias[...]
    ids = jnp.arange(self.cfg.vocab_size)
    never = (ids == self.cfg.mask_id) | (ids >= self.cfg.num_real_tokens)
    return jnp.where(never, MASKED_LOGIT, logits)

  def context_layer(self, layer, x, positions):
    """Causal self-attention block over a token stream. x: (B, S, D).

    Returns the new x and this layer's (k, v), each head-major (B, H, S, Dh): the layout of
    the KV cache and of the context block of `window_layer`.
    """
    block = self.blocks[layer]
    q, k, v = block.project_qkv(x, positions)
    return (block.finish(x, attention.causal_attention(q, k, v)),
            (jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)))

  def window_layer(self, layer, x, positions, ctx_k, ctx_v, ctx_len, outputs_from: int = 0):
    """Window-stream block (see attention.window_attention). x: (B, T, W, D).

    Returns the new x of slots outputs_from.. (B, T, W - outputs_from, D) - the earlier slots
    get K/V only - and the window's own (k, v) of all W slots, each (B, T, W, H, Dh).
    """
    block = self.blocks[layer]
    q, k, v = block.project_qkv(x, positions)
    q, x = q[:, :, outputs_from:], x[:, :, outputs_from:]
    attn = attention.window_attention(q, k, v, ctx_k, ctx_v, ctx_len)
    return block.finish(x, attn), (k, v)

  def window_stream(self, x, positions, ctx_kvs, ctx_len, outputs_from: int = 0):
    """Run all layers over window slots x: (B, T, W, D) against per-layer context (k, v).

    Returns the final hidden states of slots outputs_from.. (B, T, W - outputs_from, D) and
    per-layer window (k, v) of all W slots. A decode step passes its token count: their final
    states are never read, so the last layer gives them K/V only (no attention output, no
    MLP).
    """
    kvs = []
    last = len(ctx_kvs) - 1
    for layer, (ctx_k, ctx_v) in enumerate(ctx_kvs):
      x, kv = self.window_layer(layer, x, positions, ctx_k, ctx_v, ctx_len,
                                outputs_from if layer == last else 0)
      kvs.append(kv)
    return x, kvs

  def __call__(self, tokens, positions=None):
    """Teacher forward over (B, S) tokens -> logits (B, S, V) and per-layer context (k, v)
    (head-major, (B, H, S, Dh))."""
    if positions is None:
      positions = jnp.arange(tokens.shape[1])[None, :]
    x = self.embed_tokens(tokens)
    kvs = []
    for layer in range(self.cfg.num_layers):
      x, kv = rematerialized(self.cfg, functools.partial(self.context_layer, layer))(x, positions)
      kvs.append(kv)
    return self.logits(x), kvs
