"""Per-row ("ragged") decode state: every batch row at its own position.

decode.py's loops move all rows together (one scalar position). A verifier that accepts a
different number of draft tokens per row, or prompts of different lengths in one call, needs
each row b to carry its own length n[b]. Buffers stay fixed-size (one compiled loop per shape);
what differs per row is only *where* a row reads and writes and how much of its cache it sees:

  * reads and writes are vmapped dynamic slices at per-row starts (`read_rows`, `write_rows`);
  * a *window* of W slots at per-row start s sits at positions s..s+W-1, attends to its cache
    positions < s and causally to itself (attention.window_attention takes a per-row context
    length), and its first `num_tokens` slots' K/V are written at s (`window_pass`).

Cache entries at positions >= a row's visible length are never read, so a window may write
K/V of tokens that are later rejected: the next window of that row starts at (or before) the
first rejected position and overwrites them.
"""

import jax
import jax.numpy as jnp


def read_rows(buffer: jax.Array, starts: jax.Array, width: int) -> jax.Array:
  """buffer (B, L, ...) -> (B, width, ...): row b's entries starts[b]..starts[b]+width-1."""
  return jax.vmap(lambda row, s: jax.lax.dynamic_slice_in_dim(row, s, width, axis=0))(
      buffer, starts)


def write_rows(buffer: jax.Array, values: jax.Array, starts: jax.Array) -> jax.Array:
  """Write values (B, W, ...) into buffer (B, L, ...) at row b's position starts[b].

  dynamic_update_slice clamps a start that would run past the end (it would then overwrite
  earlier entries), so callers size buffers to hold every write the loop can make."""
  return jax.vmap(lambda row, v, s: jax.lax.dynamic_update_slice_in_dim(
      row, v.astype(row.dtype), s, axis=0))(buffer, values, starts)


def init_cache(backbone_cfg, batch: int, length: int):
  """Per-layer (k, v), head-major (B, H, length, Dh): the layout window_attention reads."""
  shape = (batch, backbone_cfg.kv_heads, length, backbone_cfg.head_dim)
  return [(jnp.zeros(shape, backbone_cfg.compute_dtype),
           jnp.zeros(shape, backbone_cfg.compute_dtype)) for _ in range(backbone_cfg.num_layers)]


def prefill(backbone, cache, tokens: jax.Array):
  """K/V of tokens (B, P) at positions 0..P-1 from one causal forward.

  Rows with shorter prompts get K/V of their padding too; causality keeps every entry below a
  row's own length a function of that row's real tokens only, and the rest are never visible."""
  x = backbone.embed_tokens(tokens)
  positions = jnp.arange(tokens.shape[1])[None]
  new = []
  for layer in range(backbone.cfg.num_layers):
    x, (k, v) = backbone.context_layer(layer, x, positions)
    new.append((k, v))
  return [(jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), 0, axis=2),
           jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), 0, axis=2))
          for (ck, cv), (k, v) in zip(cache, new)]


def window_pass(backbone, cache, slots: jax.Array, starts: jax.Array, num_tokens: int,
                outputs_from: int = 0):
  """One ragged decode pass. slots (B, W, D) sit at positions starts[b] + 0..W-1; row b sees
  its cache positions < starts[b]. Returns the final hidden states of slots outputs_from..
  (B, W - outputs_from, D; the earlier ones get K/V only in the last layer) and the cache with
  the K/V of the first `num_tokens` slots (the token slots; hints are never cached) written
  at starts[b]."""
  width = slots.shape[1]
  positions = starts[:, None] + jnp.arange(width)[None]
  hidden, kvs = backbone.window_stream(slots[:, None], positions[:, None], cache,
                                       starts[:, None], outputs_from)

  def write(c, x):  # x: (B, 1, W, H, Dh) -> the token slots, head-major, at each row's start
    x = jnp.swapaxes(x[:, 0, :num_tokens], 1, 2)
    return jax.vmap(lambda cb, xb, s: jax.lax.dynamic_update_slice_in_dim(
        cb, xb.astype(cb.dtype), s, axis=1))(c, x, starts)

  return hidden[:, 0], [(write(ck, k), write(cv, v)) for (ck, cv), (k, v) in zip(cache, kvs)]
