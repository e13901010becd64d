"""The push-forward student (PFLM): the teacher backbone plus a noise encoder (METHOD.md s.3).

For context position t the student appends k hint states; hint i (1..k) sits at RoPE position
t + i and its logits predict the token AT position t + i. Hints carry no token embedding: they
are the noise encoder's output for (u_{t,i}, tau).

Token feedback (`token_feedback`, our extension; off for the paper's student): after the L
layers, slot j >= 2 is read from one more block whose input row j is the slot's final state
plus a projection of slot j-1's token, and which attends to the last layer's context and,
causally, to the window's rows. Under a coupling whose tokens a network cannot compute from
their noises (the Gumbel-max one), this is how a later slot learns its conditional given the
earlier tokens instead of their mixture. Decoding reads the slots in order (k - 1 passes of the
block over one row each, the earlier rows' K/V kept); training feeds the teacher's tokens in
one pass over all rows.
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from kforcing_jax import sampling
from kforcing_jax.models import attention
from kforcing_jax.models.backbone import (Backbone, BackboneConfig, Block, layer_norm,
                                          rematerialized)


def sinusoidal_features(s: jax.Array, dim: int) -> jax.Array:
  """phi(s) = [cos(2 pi s f_j) | sin(2 pi s f_j)], f_j = 10000^(-j/(dim/2)), j < dim/2."""
  half = dim // 2
  freqs = 10000.0 ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = 2.0 * math.pi * s.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class NoiseEncoder(nnx.Module):
  """z = Linear(2D->D)([phi(s u) | phi(tau)]); out = z + MLP(LN(z)), LN with bias, erf-GELU;
  s = noise_scale (1 for the authors' checkpoints)."""

  def __init__(self, d_model: int, rngs: nnx.Rngs, noise_scale: float = 1.0):
    d, f = d_model, 4 * d_model
    # phi's frequencies are <= 1 per unit of u: scaling u gives the encoder up to
    # noise_scale periods over [0, 1), fine enough to carve CDF intervals ~1/V wide
    self.noise_scale = noise_scale
    normal = lambda shape, fan_in, axes: nnx.Param(  # noqa: E731
        fan_in ** -0.5 * jax.random.normal(rngs.params(), shape), logical_axes=axes)
    self.d_model = d
    self.proj = normal((2 * d, d), 2 * d, (None, 'embed'))
    self.proj_bias = nnx.Param(jnp.zeros((d,)), logical_axes=('embed',))
    self.norm_scale = nnx.Param(jnp.ones((d,)), logical_axes=('embed',))
    self.norm_bias = nnx.Param(jnp.zeros((d,)), logical_axes=('embed',))
    self.mlp_in = normal((d, f), d, ('embed', 'mlp'))
    self.mlp_in_bias = nnx.Param(jnp.zeros((f,)), logical_axes=('mlp',))
    self.mlp_out = normal((f, d), f, ('mlp', 'embed'))
    self.mlp_out_bias = nnx.Param(jnp.zeros((d,)), logical_axes=('embed',))

  def __call__(self, u: jax.Array, tau: jax.Array) -> jax.Array:
    """u: (...,) noises; tau broadcastable to u. Returns float32 hints (..., D)."""
    tau = jnp.broadcast_to(tau, u.shape)
    feats = jnp.concatenate([sinusoidal_features(u * self.noise_scale, self.d_model),
                             sinusoidal_features(tau, self.d_model)], axis=-1)
    z = feats @ self.proj[...] + self.proj_bias[...]
    h = layer_norm(z, self.norm_scale[...], self.norm_bias[...])
    h = jax.nn.gelu(h @ self.mlp_in[...] + self.mlp_in_bias[...], approximate=False)
    return z + h @ self.mlp_out[...] + self.mlp_out_bias[...]


class PushForwardLM(nnx.Module):
  """Teacher backbone + noise encoder; `k_max` is the widest window it was trained for."""

  def __init__(self, cfg: BackboneConfig, k_max: int, rngs: nnx.Rngs):
    self.k_max = k_max
    self.backbone = Backbone(cfg, rngs)
    self.noise_encoder = NoiseEncoder(cfg.d_model, rngs, cfg.noise_scale)
    if cfg.token_feedback and k_max > 1:
      # a k = 1 student has no later slot, so no block (its tensors equal one without feedback);
      # zero-initialised token projection and block outputs: a fresh feedback block passes
      # its input through, so the student starts as the one without feedback
      self.feedback = Block(cfg, rngs)
      for name in ('attn_out', 'mlp_out'):
        getattr(self.feedback, name)[...] = jnp.zeros_like(getattr(self.feedback, name)[...])
      self.feedback_in = nnx.Param(jnp.zeros((cfg.d_model, cfg.d_model)),
                                   logical_axes=(None, 'embed'))

  def hint_states(self, u, tau):
    return self.noise_encoder(u, tau).astype(self.backbone.cfg.compute_dtype)

  def _fed(self, tokens):
    """What a fed token adds to its row's input: its embedding through feedback_in."""
    cast = self.feedback_in[...].astype(self.backbone.cfg.compute_dtype)
    return self.backbone.embed_tokens(tokens) @ cast

  def _feedback_rows(self, hidden, previous, positions, last_ctx, ctx_len, prefix_kv):
    """The feedback block over window rows. hidden (B, T, W, D): the rows' final states;
    previous (B, T, W - 1): the tokens of slots 1..W-1, fed to rows 2..W; positions
    broadcastable to (B, T, W); last_ctx: the last layer's context (k, v) head-major; prefix_kv:
    (k, v) (B, T, P, Hkv, Dh) of the last layer's window slots before the rows (a decode
    window's pending tokens, a double forward's first half), or None. -> (B, T, W, D)."""
    x = hidden + jnp.pad(self._fed(previous), ((0, 0), (0, 0), (1, 0), (0, 0)))
    block = self.feedback
    q, k, v = block.project_qkv(x, positions)
    if prefix_kv is not None:
      k = jnp.concatenate([prefix_kv[0].astype(k.dtype), k], axis=2)
      v = jnp.concatenate([prefix_kv[1].astype(v.dtype), v], axis=2)
    return block.finish(x, attention.window_attention(q, k, v, *last_ctx, ctx_len))

  def slot_readout(self, hidden, positions, last_ctx, ctx_len, pick, prefix_kv=None,
                   fed=None):
    """Slot logits and tokens from the hints' final states hidden (B, T, W, D).

    pick(j, logits (B, T, V)) -> tokens (B, T): slot j's token (the readout; a decoder's
    penalised one), called for j = 0..W-1 in order. Without token feedback the logits are
    the head's and the tokens the picks. With it, slot j >= 1 is read from the feedback block
    after slots < j are picked (one block pass over row j, the earlier rows' K/V kept); fed
    (B, T, W): teacher tokens to feed instead (training: one pass over all rows; the tokens
    returned are then the picks of those logits; the two paths agree when fed the picks).
    Returns (logits
    (B, T, W, V), tokens (B, T, W)).
    """
    width = hidden.shape[2]
    positions = jnp.broadcast_to(positions, hidden.shape[:3])
    if not hasattr(self, 'feedback') or width == 1:
      logits = self.backbone.logits(hidden)
      return logits, jnp.stack([pick(j, logits[:, :, j]) for j in range(width)], axis=2)
    head = self.backbone.logits
    if fed is not None:
      out = self._feedback_rows(hidden, fed[..., :-1], positions, last_ctx, ctx_len, prefix_kv)
      logits = jnp.concatenate([head(hidden[:, :, :1]), head(out[:, :, 1:])], axis=2)
      return logits, jnp.stack([pick(j, logits[:, :, j]) for j in range(width)], axis=2)
    # slot by slot, one row per pass: row j's input is final once slot j-1 is picked, so its
    # K/V are computed once and kept for the later rows (what _feedback_rows would recompute)
    block = self.feedback
    _, k0, v0 = block.project_qkv(hidden[:, :, :1], positions[:, :, :1])
    keys, values = [k0], [v0]
    if prefix_kv is not None:
      keys.insert(0, prefix_kv[0].astype(k0.dtype))
      values.insert(0, prefix_kv[1].astype(v0.dtype))
    logits = [head(hidden[:, :, 0])]
    tokens = [pick(0, logits[0])]
    for j in range(1, width):
      x = hidden[:, :, j:j + 1] + self._fed(tokens[-1][:, :, None])
      q, k, v = block.project_qkv(x, positions[:, :, j:j + 1])
      keys.append(k)
      values.append(v)
      attn = attention.window_attention(q, jnp.concatenate(keys, axis=2),
                                        jnp.concatenate(values, axis=2), *last_ctx, ctx_len)
      logits.append(head(block.finish(x, attn)[:, :, 0]))
      tokens.append(pick(j, logits[j]))
    return jnp.stack(logits, axis=2), jnp.stack(tokens, axis=2)

  def __call__(self, tokens, u, tau, fed=None):
    """All-windows training forward.

    tokens: (B, N); u: (B, N, k) with k <= k_max; tau: (B,) temperature per sequence; fed
    (B, N, k): under token feedback, the tokens fed to slots 2..k (the teacher's, in
    training; default: the student's own readout, slot by slot, as it decodes).
    Returns hint logits (B, N, k, V) - slot (t, i-1) predicts token t + i - and the per-layer
    context (k, v), which are exactly the teacher's causal computation on `tokens`.
    """
    n, k = tokens.shape[1], u.shape[2]
    positions = jnp.arange(n)
    x = self.backbone.embed_tokens(tokens)
    hints = self.hint_states(u, tau[:, None, None])
    hint_positions = positions[:, None] + jnp.arange(1, k + 1)[None, :]
    ctx_len = (positions + 1)[None, :]
    ctx_kvs = []
    for layer in range(self.backbone.cfg.num_layers):
      x, hints, kv = rematerialized(self.backbone.cfg, functools.partial(self._layer, layer))(
          x, hints, positions[None, :], hint_positions[None], ctx_len)
      ctx_kvs.append(kv)
    if not hasattr(self, 'feedback'):
      return self.backbone.logits(hints), ctx_kvs
    pick = lambda j, logits: sampling.student_tokens(  # noqa: E731
        self.backbone.cfg, logits, u[..., j])
    logits, _ = self.slot_readout(hints, hint_positions[None], ctx_kvs[-1], ctx_len, pick,
                                  fed=fed)
    return logits, ctx_kvs

  def _layer(self, layer, x, hints, positions, hint_positions, ctx_len):
    """One layer of the context stream and the hint window stream (one remat unit)."""
    x, (ck, cv) = self.backbone.context_layer(layer, x, positions)
    hints, _ = self.backbone.window_layer(layer, hints, hint_positions, ck, cv, ctx_len)
    return x, hints, (ck, cv)


def init_from(source_params: dict, fresh_params: dict, source_kind: str) -> tuple[dict, list]:
  """Student params from a teacher: every backbone/head weight (and, from a student, the noise
  encoder) copied into `fresh_params`, a freshly initialised student tree. Returns (params,
  names of the tensors kept fresh). A missing or mis-shaped tensor names itself and stops."""
  source = {'backbone': source_params} if source_kind == 'ar' else source_params
  src_flat = dict(jax.tree_util.tree_leaves_with_path(source))
  created = []

  def take(path, fresh):
    name = jax.tree_util.keystr(path)
    if path not in src_flat:
      if path[0].key == 'noise_encoder' and source_kind == 'ar':
        created.append(name)  # the only new part of a student initialised from the teacher
        return fresh
      if path[0].key in ('feedback', 'feedback_in'):
        created.append(name)  # token feedback, new to a student without it
        return fresh
      raise ValueError(f'teacher has no tensor {name}: not the same architecture.')
    src = src_flat[path]
    if src.shape != fresh.shape:
      raise ValueError(f'teacher tensor {name} has shape {src.shape} but the student needs '
                       f'{fresh.shape}: the teacher config (vocab, d_model, layers, heads) '
                       'does not match this config.')
    return jnp.copy(src)  # a copy: the student's state is donated, the teacher's is not

  return jax.tree_util.tree_map_with_path(take, fresh_params), created
