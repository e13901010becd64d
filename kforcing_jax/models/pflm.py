"""The push-forward student (PFLM): the teacher backbone plus a noise encoder (METHOD.md s.3).

For context position t the student appends k hint states; hint i (1..k) sits at RoPE position
t + i and its logits predict the token AT position t + i. Hints carry no token embedding: they
are the noise encoder's output for (u_{t,i}, tau).
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from kforcing_jax.models.backbone import Backbone, BackboneConfig, layer_norm, rematerialized


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

  def hint_states(self, u, tau):
    return self.noise_encoder(u, tau).astype(self.backbone.cfg.compute_dtype)

  def __call__(self, tokens, u, tau):
    """All-windows training forward.

    tokens: (B, N); u: (B, N, k) with k <= k_max; tau: (B,) temperature per sequence.
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
    return self.backbone.logits(hints), ctx_kvs

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
      raise ValueError(f'teacher has no tensor {name}: not the same architecture.')
    src = src_flat[path]
    if src.shape != fresh.shape:
      raise ValueError(f'teacher tensor {name} has shape {src.shape} but the student needs '
                       f'{fresh.shape}: the teacher config (vocab, d_model, layers, heads) '
                       'does not match this config.')
    return jnp.copy(src)  # a copy: the student's state is donated, the teacher's is not

  return jax.tree_util.tree_map_with_path(take, fresh_params), created
