"""Rotary embeddings and the two attention patterns every K-Forcing pass is built from.

Every forward pass in this project is one of two shapes:

* a *context stream*: ordinary causal self-attention over a run of tokens;
* a *window stream*: T windows of W slots each. Slot (t, i) attends to the first
  ``ctx_len[t]`` keys of a shared context (earlier tokens, or a KV cache) and,
  causally, to slots (t, <= i) of its own window. Both blocks share ONE softmax.

The student's all-windows training forward (hints), the self-forcing "double forward"
(first-half tokens followed by second-half hints) and every decode step (new tokens
followed by hints, against the KV cache) are window streams with different W, so the
staircase mask of METHOD.md section 3 never exists as a dense (N + N*k)^2 tensor: the
scores are (T, W, S) for the context block and (T, W, W) for the own-window block.
"""

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def rope_inverse_frequencies(head_dim: int, base: float = 10000.0) -> jax.Array:
  """inv_freq[j] = base^(-2j/head_dim), j < head_dim/2 (the PyTorch `rotary_emb.inv_freq`)."""
  return 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotate-half RoPE over the full head dim: channel j pairs with j + Dh/2.

  x: (..., H, Dh); positions: broadcastable to x.shape[:-2] (integer token positions).
  """
  head_dim = x.shape[-1]
  inv_freq = rope_inverse_frequencies(head_dim, base)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (..., Dh/2)
  cos = jnp.cos(angles)[..., None, :]
  sin = jnp.sin(angles)[..., None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


def grouped(q: jax.Array, kv_heads: int) -> jax.Array:
  """q (..., H, Dh) -> (..., Hkv, G, Dh), G = H / Hkv: under grouped-query attention query
  head h attends with K/V head h // G."""
  return q.reshape(q.shape[:-2] + (kv_heads, q.shape[-2] // kv_heads, q.shape[-1]))


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Causal self-attention. q: (B, S, H, Dh), k, v: (B, S, Hkv, Dh) with Hkv dividing H
  (Hkv < H: grouped-query attention) -> (B, S, H, Dh)."""
  if k.shape[-2] != q.shape[-2]:
    return _grouped_causal_attention(q, k, v)
  scale = q.shape[-1] ** -0.5
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32) * scale
  s = q.shape[1]
  causal = jnp.tril(jnp.ones((s, s), dtype=bool))
  scores = jnp.where(causal, scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', probs, v)


def _grouped_causal_attention(q, k, v):
  scale = q.shape[-1] ** -0.5
  qg = grouped(q, k.shape[-2])
  scores = jnp.einsum('bqhgd,bkhd->bhgqk', qg, k, preferred_element_type=jnp.float32) * scale
  s = q.shape[1]
  scores = jnp.where(jnp.tril(jnp.ones((s, s), dtype=bool)), scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum('bhgqk,bkhd->bqhgd', probs, v).reshape(q.shape)


def own_causal(queries: int, width: int) -> jax.Array:
  """(queries, width) mask of the own-window block when the queries are the last `queries`
  of `width` slots: query i (slot width - queries + i) sees slots <= its own."""
  return jnp.tri(queries, width, width - queries, dtype=bool)


def window_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     ctx_k: jax.Array, ctx_v: jax.Array,
                     ctx_len: jax.Array) -> jax.Array:
  """Window-stream attention: context block + causal own-window block, one softmax.

  q, k, v: (B, T, W, H, Dh) window slots.
  ctx_k, ctx_v: (B, H, S, Dh) shared context keys/values (tokens or a KV cache), head-major
    so the batched matmuls read them in place (a (B, S, H, Dh) cache gets transposed by XLA
    on every decode step: 6x slower attention at batch 64 on CPU).
  ctx_len: int array broadcastable to (B, T): window t sees context keys s < ctx_len.
  q may hold only the LAST Wq <= W slots of each window (k and v all W): the outputs of the
  first W - Wq slots are then not computed (a decode step's last layer, whose token slots are
  only cached). Returns (B, T, Wq, H, Dh).
  Grouped-query attention: k, v (B, T, W, Hkv, Dh) and ctx_k,
  ctx_v (B, Hkv, S, Dh) with Hkv dividing H (each K/V head serves H / Hkv query heads).
  """
  if k.shape[-2] != q.shape[-2]:
    return _grouped_window_attention(q, k, v, ctx_k, ctx_v, ctx_len)
  scale = q.shape[-1] ** -0.5
  num_ctx = ctx_k.shape[2]
  ctx_scores = jnp.einsum('btwhd,bhsd->bhtws', q, ctx_k,
                          preferred_element_type=jnp.float32) * scale
  visible = jnp.arange(num_ctx) < jnp.broadcast_to(ctx_len, q.shape[:2])[:, None, :, None, None]
  ctx_scores = jnp.where(visible, ctx_scores, NEG_INF)
  own_scores = jnp.einsum('btwhd,btxhd->bhtwx', q, k,
                          preferred_element_type=jnp.float32) * scale
  own_scores = jnp.where(own_causal(q.shape[2], k.shape[2]), own_scores, NEG_INF)
  probs = jax.nn.softmax(jnp.concatenate([ctx_scores, own_scores], axis=-1), axis=-1)
  probs = probs.astype(v.dtype)
  ctx_probs, own_probs = probs[..., :num_ctx], probs[..., num_ctx:]
  return (jnp.einsum('bhtws,bhsd->btwhd', ctx_probs, ctx_v)
          + jnp.einsum('bhtwx,btxhd->btwhd', own_probs, v))


def _grouped_window_attention(q, k, v, ctx_k, ctx_v, ctx_len):
  """window_attention with Hkv < H: the query heads of a group share one K/V head (einsums
  over (Hkv, G), so the cache is read once per K/V head, never repeated to H heads)."""
  scale = q.shape[-1] ** -0.5
  qg = grouped(q, k.shape[-2])
  num_ctx = ctx_k.shape[2]
  ctx_scores = jnp.einsum('btwhgd,bhsd->bhgtws', qg, ctx_k,
                          preferred_element_type=jnp.float32) * scale
  visible = (jnp.arange(num_ctx)
             < jnp.broadcast_to(ctx_len, q.shape[:2])[:, None, None, :, None, None])
  ctx_scores = jnp.where(visible, ctx_scores, NEG_INF)
  own_scores = jnp.einsum('btwhgd,btxhd->bhgtwx', qg, k,
                          preferred_element_type=jnp.float32) * scale
  own_scores = jnp.where(own_causal(q.shape[2], k.shape[2]), own_scores, NEG_INF)
  probs = jax.nn.softmax(jnp.concatenate([ctx_scores, own_scores], axis=-1), axis=-1)
  probs = probs.astype(v.dtype)
  ctx_probs, own_probs = probs[..., :num_ctx], probs[..., num_ctx:]
  out = (jnp.einsum('bhgtws,bhsd->btwhgd', ctx_probs, ctx_v)
         + jnp.einsum('bhgtwx,btxhd->btwhgd', own_probs, v))
  return out.reshape(q.shape)
