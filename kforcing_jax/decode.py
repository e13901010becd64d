"""Jitted decode loops with a preallocated KV cache: the AR teacher and k-token PFLM decoding.

Both loops are one `lax.while_loop` inside one jit per (batch, length, k) shape family, and
share the same step: a *window* of slots attends to the cache (positions < c) and causally to
itself (models/attention.window_attention), then the K/V of the window's token slots are
written into the cache at c. Hint slots are never cached.

  AR step:    window = [token c]                      logits of the token slot -> token c+1
  PFLM step:  window = [tokens c..c+k-1 | k hints]    hint i at position c+k-1+i -> that token

Noise: the uniform for output position j of row b is uniform(fold_in(key, j))[b], so the AR
decoder and a student of any k see the same u at the same position, and a run is reproducible.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp

from kforcing_jax import sampling, sharding
from kforcing_jax.models import FunctionalModel


def position_uniforms(key: jax.Array, positions: jax.Array, batch: int) -> jax.Array:
  """(batch, len(positions)) uniforms in [0, 1), one stream per output position."""
  draw = lambda p: jax.random.uniform(jax.random.fold_in(key, p), (batch,))  # noqa: E731
  return jax.vmap(draw, out_axes=1)(positions)


def init_cache(backbone_cfg, batch: int, length: int):
  """Per-layer (k, v), each head-major (B, H, length, Dh) in the compute dtype."""
  shape = (batch, backbone_cfg.num_heads, length, backbone_cfg.head_dim)
  zeros = lambda: jnp.zeros(shape, backbone_cfg.compute_dtype)  # noqa: E731
  return [(zeros(), zeros()) for _ in range(backbone_cfg.num_layers)]


def write_cache(cache, kvs, start):
  """Write per-layer head-major (k, v) (B, H, n, Dh) into the cache at positions start.."""
  return [(jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), start, axis=2),
           jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), start, axis=2))
          for (ck, cv), (k, v) in zip(cache, kvs)]


def prefill(backbone, cache, tokens):
  """Cache the K/V of `tokens` (B, P) at positions 0..P-1 (one causal forward)."""
  if tokens.shape[1] == 0:
    return cache
  x = backbone.embed_tokens(tokens)
  positions = jnp.arange(tokens.shape[1])[None]
  kvs = []
  for layer in range(backbone.cfg.num_layers):
    x, kv = backbone.context_layer(layer, x, positions)
    kvs.append(kv)
  return write_cache(cache, kvs, 0)


def window_step(backbone, cache, cache_len, slots, positions, num_tokens: int):
  """One decode step. slots: (B, W, D) states at `positions` (W,); the first `num_tokens`
  slots are tokens to cache. Returns final hidden states (B, W, D) and the updated cache."""
  hidden, kvs = backbone.window_stream(slots[:, None], positions[None, None], cache, cache_len)
  # window (k, v) are (B, 1, W, H, Dh): the token slots go into the cache, head-major
  new = [tuple(jnp.swapaxes(x[:, 0, :num_tokens], 1, 2) for x in kv) for kv in kvs]
  return hidden[:, 0], write_cache(cache, new, cache_len)


def ar_step(backbone, cache, token, pos, u, temperature):
  """The AR loop body: token (B, 1) at position `pos` -> (next token (B,), its logits, cache)."""
  hidden, cache = window_step(backbone, cache, pos, backbone.embed_tokens(token), pos[None], 1)
  logits = backbone.logits(hidden[:, 0])
  return sampling.inverse_cdf_sample(logits, u, temperature), logits, cache


def pflm_step(backbone, cache, pending, start, hints, counts, freq_penalty: float, active):
  """The k-token loop body: pending tokens (B, k) at start..start+k-1 and hint states
  (B, k, D) for start+k..start+2k-1 -> (k tokens (B, k), updated counts, cache)."""
  k = pending.shape[1]
  slots = jnp.concatenate([backbone.embed_tokens(pending), hints], axis=1)
  hidden, cache = window_step(backbone, cache, start, slots, start + jnp.arange(2 * k), k)
  tokens, counts = penalized_argmax(backbone.logits(hidden[:, k:]), counts, freq_penalty, active)
  return tokens, counts, cache


def penalized_argmax(logits, counts, freq_penalty: float, active):
  """Slot-by-slot argmax(logits_j - penalty * counts), counting each emitted token.

  logits: (B, k, V); counts: (B, V) generated-token counts (prefix excluded); active: (B, k)
  whether slot j's token is a real output (slots past the requested length are not counted).
  """
  tokens = []
  for j in range(logits.shape[1]):
    token = jnp.argmax(logits[:, j] - freq_penalty * counts, axis=-1).astype(jnp.int32)
    counts = counts + jax.nn.one_hot(token, counts.shape[-1], dtype=counts.dtype) * active[:, j,
                                                                                           None]
    tokens.append(token)
  return jnp.stack(tokens, axis=1), counts


def _finish_eos(tokens, prefix_len: int, eos_id, pad_id: int):
  """Replace everything after the first generated EOS by `pad_id` (fixed-length output)."""
  if eos_id is None:
    return tokens
  generated = jnp.arange(tokens.shape[1]) >= prefix_len
  is_eos = (tokens == eos_id) & generated
  after = jnp.cumsum(is_eos, axis=1) - is_eos > 0
  return jnp.where(after, pad_id, tokens)


@functools.partial(jax.jit, static_argnames=('model', 'gen_len', 'eos_id', 'mesh_rules',
                                             'return_logits'))
def generate_ar(model: FunctionalModel, params, prompts, key, temperature=1.0, *,
                gen_len: int, eos_id: int | None = None, mesh_rules=None,
                return_logits: bool = False):
  """Ancestral sampling by inverse CDF. prompts (B, P) -> tokens (B, gen_len), prompt included.

  Rows stop at EOS (the rest is padding); the loop exits early once every row has stopped.
  With return_logits, also the (B, gen_len, V) logits each step computed (row j: the logits
  that produced token j; rows <= P-1 stay zero) - for tests against a full forward.
  """
  with _maybe_rules(mesh_rules):
    backbone = model.module(params)
    cfg = backbone.cfg
    batch, plen = prompts.shape
    _check_lengths(plen, gen_len, 1)
    tokens = jnp.full((batch, gen_len), cfg.mask_id, jnp.int32).at[:, :plen].set(prompts)
    cache = prefill(backbone, init_cache(cfg, batch, gen_len), prompts[:, :-1])
    temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (batch,))

    logit_rows = jnp.zeros((batch, gen_len, cfg.vocab_size) if return_logits else (0,))

    def body(state):
      pos, tokens, cache, done, logit_rows = state
      u = position_uniforms(key, pos[None] + 1, batch)[:, 0]
      nxt, logits, cache = ar_step(backbone, cache,
                                   jax.lax.dynamic_slice_in_dim(tokens, pos, 1, axis=1), pos, u,
                                   temperature)
      if return_logits:
        logit_rows = jax.lax.dynamic_update_slice_in_dim(logit_rows, logits[:, None], pos + 1, 1)
      nxt = jnp.where(done, cfg.mask_id, nxt)
      tokens = jax.lax.dynamic_update_slice_in_dim(tokens, nxt[:, None], pos + 1, axis=1)
      if eos_id is not None:
        done = done | (nxt == eos_id)
      return pos + 1, tokens, cache, done, logit_rows

    def cond(state):
      pos, _, _, done, _ = state
      return (pos + 1 < gen_len) & ~jnp.all(done)

    state = (jnp.asarray(plen - 1, jnp.int32), tokens, cache, jnp.zeros((batch,), bool),
             logit_rows)
    _, tokens, _, _, logit_rows = jax.lax.while_loop(cond, body, state)
    tokens = _finish_eos(tokens, plen, eos_id, cfg.mask_id)
    return (tokens, logit_rows) if return_logits else tokens


@functools.partial(jax.jit, static_argnames=('model', 'gen_len', 'k', 'freq_penalty', 'eos_id',
                                             'mesh_rules'))
def generate_pflm(model: FunctionalModel, params, prompts, key, tau=1.0, *, gen_len: int, k: int,
                  freq_penalty: float = 0.0, eos_id: int | None = None, mesh_rules=None):
  """k-token push-forward decoding. prompts (B, P), P >= k -> tokens (B, gen_len).

  Each step feeds the k tokens emitted by the previous step (the prompt's last k at first)
  plus k hint states, and emits k tokens as (frequency-penalised) argmax of the hint logits.
  """
  if k > model.k_max:
    raise ValueError(f'k={k} is larger than this student supports (k_max={model.k_max}); '
                     f'decode with k <= {model.k_max} or distill a wider stage.')
  with _maybe_rules(mesh_rules):
    student = model.module(params)
    backbone = student.backbone
    cfg = backbone.cfg
    batch, plen = prompts.shape
    _check_lengths(plen, gen_len, k)
    buffer_len = gen_len + k  # the last step may run past gen_len; cut at the end
    tokens = jnp.full((batch, buffer_len), cfg.mask_id, jnp.int32).at[:, :plen].set(prompts)
    cache = prefill(backbone, init_cache(cfg, batch, buffer_len), prompts[:, :plen - k])
    tau = jnp.broadcast_to(jnp.asarray(tau, jnp.float32), (batch,))
    # every hint state of the run in one batched call, hoisted out of the loop: the noise
    # for position j does not depend on earlier tokens
    all_hints = student.hint_states(
        position_uniforms(key, jnp.arange(buffer_len + k), batch), tau[:, None])

    def body(state):
      start, tokens, cache, counts, done = state  # tokens start..start+k-1 are pending
      out_pos = start + k + jnp.arange(k)
      active = (out_pos < gen_len)[None, :] & ~done[:, None]
      new, counts, cache = pflm_step(
          backbone, cache, jax.lax.dynamic_slice_in_dim(tokens, start, k, axis=1), start,
          jax.lax.dynamic_slice_in_dim(all_hints, start + k, k, axis=1), counts, freq_penalty,
          active)
      new = jnp.where(active, new, cfg.mask_id)
      tokens = jax.lax.dynamic_update_slice_in_dim(tokens, new, start + k, axis=1)
      if eos_id is not None:
        done = done | jnp.any((new == eos_id) & active, axis=1)
      return start + k, tokens, cache, counts, done

    def cond(state):
      start, _, _, _, done = state
      return (start + k < gen_len) & ~jnp.all(done)

    counts = jnp.zeros((batch, cfg.vocab_size), jnp.float32)
    state = (jnp.asarray(plen - k, jnp.int32), tokens, cache, counts, jnp.zeros((batch,), bool))
    _, tokens, _, _, _ = jax.lax.while_loop(cond, body, state)
    return _finish_eos(tokens[:, :gen_len], plen, eos_id, cfg.mask_id)


def _check_lengths(prefix_len: int, gen_len: int, k: int):
  if prefix_len < max(k, 1):
    raise ValueError(f'prompt length {prefix_len} is shorter than k={k}: k-token decoding feeds '
                     'the last k prompt tokens in its first step; use longer prompts.')
  if gen_len <= prefix_len:
    raise ValueError(f'gen_len={gen_len} must exceed the prompt length {prefix_len}.')


def _maybe_rules(mesh_rules):
  """`mesh_rules` = (mesh, rules) activates sharding constraints; None runs unconstrained."""
  if mesh_rules is None:
    return contextlib.nullcontext()
  return sharding.use_mesh_rules(*mesh_rules)
