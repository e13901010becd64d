"""Jitted decode loops with a preallocated KV cache: the AR teacher and k-token PFLM decoding.

Both loops are one `lax.while_loop` inside one jit per (batch, length, k) shape family, and
share the same step: a *window* of slots attends to the cache (positions < c) and causally to
itself (models/attention.window_attention), then the K/V of the window's token slots are
written into the cache at c. Hint slots are never cached.

  AR step:    window = [token c]                      logits of the token slot -> token c+1
  PFLM step:  window = [tokens c..c+k-1 | k hints]    hint i at position c+k-1+i -> that token

Noise: the uniform for output position j of row b is uniform(fold_in(key, j))[b], so the AR
decoder and a student of any k see the same u at the same position, and a run is reproducible.

`generate_ar` / `generate_pflm` are plain jits; `sharded_decoder` is the same loop with declared
shardings, and `decoder(export, layout, ...)` binds a loaded model to its settings (`Decoder`).
"""

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from kforcing_jax import progress, sampling, sharding, train_state
from kforcing_jax.models import FunctionalModel

CACHE_AXES = ('batch', 'heads', 'cache_length', 'head_dim')


def position_uniforms(key: jax.Array, positions: jax.Array, batch: int) -> jax.Array:
  """(batch, len(positions)) uniforms in [0, 1), one stream per output position."""
  draw = lambda p: jax.random.uniform(jax.random.fold_in(key, p), (batch,))  # noqa: E731
  return jax.vmap(draw, out_axes=1)(positions)


def init_cache(backbone_cfg, batch: int, length: int):
  """Per-layer (k, v), each head-major (B, H, length, Dh) in the compute dtype."""
  shape = (batch, backbone_cfg.kv_heads, length, backbone_cfg.head_dim)
  zeros = lambda: sharding.constrain(  # noqa: E731
      jnp.zeros(shape, backbone_cfg.compute_dtype), CACHE_AXES)
  return [(zeros(), zeros()) for _ in range(backbone_cfg.num_layers)]


def write_cache(cache, kvs, start):
  """Write per-layer head-major (k, v) (B, H, n, Dh) into the cache at positions start..

  The result is constrained to the cache layout so the while-loop carry keeps one sharding
  (no resharding of the whole cache between steps)."""
  write = lambda c, x: sharding.constrain(  # noqa: E731
      jax.lax.dynamic_update_slice_in_dim(c, x.astype(c.dtype), start, axis=2), CACHE_AXES)
  return [(write(ck, k), write(cv, v)) for (ck, cv), (k, v) in zip(cache, kvs)]


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


def window_step(backbone, cache, cache_len, slots, positions, num_tokens: int,
                outputs_from: int = 0):
  """One decode step. slots: (B, W, D) states at `positions` (W,); the first `num_tokens`
  slots are tokens to cache. Returns the final hidden states of slots outputs_from..
  (B, W - outputs_from, D) and the updated cache."""
  hidden, kvs = backbone.window_stream(slots[:, None], positions[None, None], cache, cache_len,
                                       outputs_from)
  # window (k, v) are (B, 1, W, H, Dh): the token slots go into the cache, head-major
  new = [tuple(jnp.swapaxes(x[:, 0, :num_tokens], 1, 2) for x in kv) for kv in kvs]
  return hidden[:, 0], write_cache(cache, new, cache_len)


def ar_step(backbone, cache, token, pos, u, temperature):
  """The AR loop body: token (B, 1) at position `pos` -> (next token (B,), its logits, cache)."""
  hidden, cache = window_step(backbone, cache, pos, backbone.embed_tokens(token), pos[None], 1)
  logits = backbone.logits(hidden[:, 0])
  return (sampling.inverse_cdf_sample(logits, u, temperature, backbone.cfg.cdf_order), logits,
          cache)


def pflm_step(backbone, cache, pending, start, hints, u, counts, freq_penalty: float, active,
              later_slot_temperature: float = 1.0, student=None):
  """The k-token loop body: pending tokens (B, k) at start..start+k-1 and hint states
  (B, k, D) for start+k..start+2k-1, made from the noises u (B, k) -> (k tokens (B, k),
  updated counts, cache). `student` (the PushForwardLM module of `backbone`) is needed when
  it has token feedback: its later slots are read after the earlier ones are picked."""
  k = pending.shape[1]
  slots = jnp.concatenate([backbone.embed_tokens(pending), hints], axis=1)
  # the pending tokens' final states are never read: the last layer only caches their K/V
  hidden, cache = window_step(backbone, cache, start, slots, start + jnp.arange(2 * k), k,
                              outputs_from=k)
  cfg = backbone.cfg
  if not cfg.token_feedback:
    tokens, counts = penalized_readout(backbone.logits(hidden), counts, freq_penalty, active,
                                       u, cfg.readout, cfg.cdf_order, later_slot_temperature)
    return tokens, counts, cache
  if student is None:
    raise ValueError('a student with token feedback decodes through its own module: pass '
                     'student= to pflm_step.')
  counted = [counts]

  def pick(j, logits):  # logits (B, 1, V): one window per row
    token, counted[0] = readout_slot(j, logits[:, 0], counted[0], freq_penalty, active, u,
                                     cfg.readout, cfg.cdf_order, later_slot_temperature)
    return token[:, None]

  # the pending tokens are in the cache now: the feedback block sees them as context
  _, tokens = student.slot_readout(hidden[:, None], (start + k + jnp.arange(k))[None, None],
                                   cache[-1], start + k, pick)
  return tokens[:, 0], counted[0], cache


def readout_slot(j: int, logits, counts, freq_penalty: float, active, u=None,
                 readout: str = 'argmax', order: str = 'id',
                 later_slot_temperature: float = 1.0):
  """Slot j's token (B,) from its logits (B, V) and the updated counts (penalized_readout)."""
  no_penalty = isinstance(freq_penalty, (int, float)) and freq_penalty == 0
  scores = logits if no_penalty else logits - freq_penalty * counts
  if j and later_slot_temperature != 1.0:
    scores = scores / later_slot_temperature
  token = sampling.readout_tokens(scores, None if u is None else u[:, j], readout, order)
  rows = jnp.arange(logits.shape[0])
  return token, counts.at[rows, token].add(active[:, j].astype(counts.dtype))


def penalized_readout(logits, counts, freq_penalty: float, active, u=None,
                      readout: str = 'argmax', order: str = 'id',
                      later_slot_temperature: float = 1.0):
  """Slot-by-slot readout of logits_j - penalty * counts (argmax, or the inverse-CDF sample for
  the slot's noise u_j: sampling.readout_tokens), counting each emitted token.

  logits: (B, k, V); counts: (B, V) generated-token counts (prefix excluded); active: (B, k)
  whether slot j's token is a real output (slots past the requested length are not counted);
  u: (B, k) the slots' noises (read by the inverse-CDF readout only);
  later_slot_temperature: the inverse-CDF readout samples slots 2..k at this temperature (1 =
  the distributions as distilled; -> 0 approaches their argmax; slot 1 always at 1).
  Each count is a scatter-add of one entry per row (a one-hot (B, V) add was a full
  vocabulary pass per slot); with no penalty the counts do not change the tokens, so the
  argmax reads the logits alone.
  """
  tokens = []
  for j in range(logits.shape[1]):
    token, counts = readout_slot(j, logits[:, j], counts, freq_penalty, active, u, readout,
                                 order, later_slot_temperature)
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



def row_axes(ndim: int, vocab_last: bool = False) -> tuple:
  """Logical names of a per-row array: the batch first; the vocabulary last for logits and
  token counts, which the output head lays out by vocabulary."""
  return ('batch',) + (None,) * (ndim - 1 - vocab_last) + (('vocab',) if vocab_last else ())


def _rows(x, vocab_last: bool = False):
  """Constrain a per-row loop buffer so the while-loop carry keeps one layout."""
  return sharding.constrain(x, row_axes(x.ndim, vocab_last))


def ar_decode_loop(model: FunctionalModel, params, prompts, key, temperature=1.0, *,
                   gen_len: int, eos_id: int | None = None, return_logits: bool = False):
  """Ancestral sampling by inverse CDF. prompts (B, P) -> tokens (B, gen_len), prompt included.

  Rows stop at EOS (the rest is padding); the loop exits early once every row has stopped.
  With return_logits, also the (B, gen_len, V) logits each step computed (row j: the logits
  that produced token j; rows <= P-1 stay zero) - for tests against a full forward.
  Traced by `generate_ar` (plain jit) and `sharded_decoder` (declared shardings).
  """
  backbone = model.module(params)
  cfg = backbone.cfg
  batch, plen = prompts.shape
  _check_lengths(plen, gen_len, 1)
  tokens = _rows(jnp.full((batch, gen_len), cfg.mask_id, jnp.int32).at[:, :plen].set(prompts))
  cache = prefill(backbone, init_cache(cfg, batch, gen_len), prompts[:, :-1])
  temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (batch,))
  logit_rows = (_rows(jnp.zeros((batch, gen_len, cfg.vocab_size)), True) if return_logits
                else jnp.zeros((0,)))

  def body(state):
    pos, tokens, cache, done, logit_rows = state
    u = position_uniforms(key, pos[None] + 1, batch)[:, 0]
    nxt, logits, cache = ar_step(backbone, cache,
                                 jax.lax.dynamic_slice_in_dim(tokens, pos, 1, axis=1), pos, u,
                                 temperature)
    if return_logits:
      logit_rows = _rows(jax.lax.dynamic_update_slice_in_dim(logit_rows, logits[:, None],
                                                             pos + 1, 1), True)
    nxt = jnp.where(done, cfg.mask_id, nxt)
    tokens = _rows(jax.lax.dynamic_update_slice_in_dim(tokens, nxt[:, None], pos + 1, axis=1))
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


def pflm_decode_loop(model: FunctionalModel, params, prompts, key, tau=1.0, *, gen_len: int,
                     k: int, freq_penalty: float = 0.0, eos_id: int | None = None,
                     later_slot_temperature: float = 1.0):
  """k-token push-forward decoding. prompts (B, P), P >= k -> tokens (B, gen_len).

  Each step feeds the k tokens emitted by the previous step (the prompt's last k at first)
  plus k hint states, and emits k tokens as the (frequency-penalised) readout of the hint
  logits (model.readout; an inverse-CDF student's slots 2..k at later_slot_temperature).
  Traced by `generate_pflm` (plain jit) and `sharded_decoder` (declared shardings).
  """
  if k > model.k_max:
    raise ValueError(f'k={k} is larger than this student supports (k_max={model.k_max}); '
                     f'decode with k <= {model.k_max} or distill a wider stage.')
  student = model.module(params)
  backbone = student.backbone
  cfg = backbone.cfg
  batch, plen = prompts.shape
  _check_lengths(plen, gen_len, k)
  buffer_len = gen_len + k  # the last step may run past gen_len; cut at the end
  tokens = _rows(jnp.full((batch, buffer_len), cfg.mask_id, jnp.int32).at[:, :plen].set(prompts))
  cache = prefill(backbone, init_cache(cfg, batch, buffer_len), prompts[:, :plen - k])
  tau = jnp.broadcast_to(jnp.asarray(tau, jnp.float32), (batch,))
  # every hint state of the run in one batched call, hoisted out of the loop: the noise
  # for position j does not depend on earlier tokens
  all_u = position_uniforms(key, jnp.arange(buffer_len + k), batch)
  all_hints = student.hint_states(all_u, tau[:, None])

  def body(state):
    start, tokens, cache, counts, done = state  # tokens start..start+k-1 are pending
    out_pos = start + k + jnp.arange(k)
    active = (out_pos < gen_len)[None, :] & ~done[:, None]
    new, counts, cache = pflm_step(
        backbone, cache, jax.lax.dynamic_slice_in_dim(tokens, start, k, axis=1), start,
        jax.lax.dynamic_slice_in_dim(all_hints, start + k, k, axis=1),
        jax.lax.dynamic_slice_in_dim(all_u, start + k, k, axis=1), counts, freq_penalty,
        active, later_slot_temperature, student)
    new = jnp.where(active, new, cfg.mask_id)
    tokens = _rows(jax.lax.dynamic_update_slice_in_dim(tokens, new, start + k, axis=1))
    if eos_id is not None:
      done = done | jnp.any((new == eos_id) & active, axis=1)
    return start + k, tokens, cache, _rows(counts, vocab_last=True), done

  def cond(state):
    start, _, _, _, done = state
    return (start + k < gen_len) & ~jnp.all(done)

  counts = _rows(jnp.zeros((batch, cfg.vocab_size), jnp.float32), vocab_last=True)
  state = (jnp.asarray(plen - k, jnp.int32), tokens, cache, counts, jnp.zeros((batch,), bool))
  _, tokens, _, _, _ = jax.lax.while_loop(cond, body, state)
  return _finish_eos(tokens[:, :gen_len], plen, eos_id, cfg.mask_id)


generate_ar = jax.jit(ar_decode_loop,
                      static_argnames=('model', 'gen_len', 'eos_id', 'return_logits'))
generate_pflm = jax.jit(pflm_decode_loop,
                        static_argnames=('model', 'gen_len', 'k', 'freq_penalty', 'eos_id',
                                         'later_slot_temperature'))

DECODE_LOOPS = {'ar': ar_decode_loop, 'pflm': pflm_decode_loop}


def rows_sharding(mesh, rules, shape, vocab_last: bool = False) -> NamedSharding:
  """Dim 0 over the batch axes when it divides them, else replicated: every device decodes
  every row, never padded rows, which would change the (batch,)-shaped noise draws."""
  return NamedSharding(mesh, sharding.logical_to_spec(row_axes(len(shape), vocab_last), rules,
                                                      shape, mesh))


def loop_compiler_options(mesh) -> dict | None:
  """XLA options for the decode loops on `mesh`'s platform.

  On CPU, XLA's default copy insertion copies every KV-cache array of the while-loop carry
  twice per step (the attention reads the cache that the step's dynamic_update_slice then
  writes); region analysis proves the in-place update safe and drops those copies, the same
  values (tests/test_decode.py). Other platforms: XLA's defaults."""
  if mesh.devices.flat[0].platform == 'cpu':
    return {'xla_cpu_copy_insertion_use_region_analysis': True}
  return None


def sharded_decoder(model: FunctionalModel, mesh, rules, kind: str, **static) -> Callable:
  """`decode(params, prompts, key, noise_scale=1.0)` -> tokens (B, gen_len) (and, for
  kind='ar' with return_logits=True, the (B, gen_len, V) logits), sharded over the batch.

  kind: 'ar' (noise_scale = temperature) or 'pflm' (noise_scale = tau); `static` are the loop's
  keyword arguments (gen_len, eos_id, k, freq_penalty, return_logits). One jit per prompt
  shape, with in/out shardings declared: params by the logical-axis rules (as
  `rundir.load_export` places them), prompts and outputs by `rows_sharding`, KV caches
  constrained by name, the key and noise_scale replicated. Prompts, key and noise_scale may be host values (identical on
  every process); on several processes read the result with `to_host`.
  """
  if kind not in DECODE_LOOPS:
    raise ValueError(f'unknown decoder kind {kind!r}; expected one of {sorted(DECODE_LOOPS)}.')
  loop = functools.partial(DECODE_LOOPS[kind], model, **static)
  param_shardings = train_state.param_shardings(model, mesh, rules)
  replicated = sharding.replicated(mesh)

  @functools.lru_cache(maxsize=None)
  def compiled_for(batch: int, prompt_len: int, key_impl: str):
    prompt_sharding = rows_sharding(mesh, rules, (batch, prompt_len))
    out_shardings = rows_sharding(mesh, rules, (batch, static['gen_len']))
    if static.get('return_logits'):
      logits_shape = (batch, static['gen_len'], model.cfg.vocab_size)
      out_shardings = (out_shardings, rows_sharding(mesh, rules, logits_shape, True))

    # the key travels as raw uint32 data: a host value every process can pass to a jit that
    # spans devices of other processes, where a single-device key array is rejected
    def run(params, prompts, key_data, noise_scale):
      with sharding.use_mesh_rules(mesh, rules):
        return loop(params, prompts, jax.random.wrap_key_data(key_data, impl=key_impl),
                    noise_scale)

    jitted = jax.jit(run, in_shardings=(param_shardings, prompt_sharding, replicated, replicated),
                     out_shardings=out_shardings, compiler_options=loop_compiler_options(mesh))
    return jitted, prompt_sharding

  def decode_batch(params, prompts, key, noise_scale=1.0):
    jitted, prompt_sharding = compiled_for(*prompts.shape, str(jax.random.key_impl(key)))
    if isinstance(prompts, jax.Array) and (jax.process_count() == 1 or
                                           not prompts.is_fully_addressable):
      prompts = jax.device_put(prompts, prompt_sharding)  # a no-op when already laid out
    else:  # host values: each process places the rows its own devices hold
      host = np.asarray(prompts, np.int32)
      prompts = jax.make_array_from_callback(host.shape, prompt_sharding, lambda i: host[i])
    return jitted(params, prompts, np.asarray(jax.random.key_data(key)),
                  np.asarray(noise_scale, np.float32))

  return decode_batch


def freq_penalty(config, k: int) -> float:
  """The frequency penalty lambda a k-token decode uses: config.decode.freq_penalty[str(k)]
  (the authors' values per k), and 0 (said in the log) for a k the table does not list. The
  one rule; reproduce refuses an unlisted K instead, since its protocol is the authors'."""
  table = config.decode.freq_penalty
  if str(k) not in table:
    progress.log(f'config.decode.freq_penalty has no entry for k={k}: decoding it with penalty 0 '
                 f'(add "{k}" to the table to change that).')
    return 0.0
  return float(table[str(k)])


@dataclasses.dataclass(frozen=True)
class Decoder:
  """A loaded model bound to its decode settings: `decoder(prompts, key)` -> tokens (B, L).

  name: 'ar' or 'pflm_k{k}' (k tokens per step); kind 'ar' | 'pflm'; gen_len: the total length
  of its outputs, prompt included; settings: what is reported beside its results (temperature,
  or tau and freq_penalty)."""
  name: str
  kind: str
  k: int
  gen_len: int
  settings: dict
  run: Callable = dataclasses.field(repr=False)

  def __call__(self, prompts, key):
    return self.run(prompts, key)


def decoder(export, layout, *, gen_len: int, k: int | None = None, eos_id: int | None = None,
            penalty: float = 0.0, temperature: float = 1.0) -> Decoder:
  """A Decoder for a `rundir.Export` on `layout`: the AR teacher samples at `temperature`;
  a student decodes k (default: its own k_max) tokens per step at tau = 1 with `penalty`."""
  if not (math.isfinite(temperature) and temperature > 0):
    raise ValueError(f'temperature={temperature}: must be a finite number > 0 (sampling divides '
                     'the logits by it; for nearly greedy tokens use a small value like 1e-3).')
  if not (math.isfinite(penalty) and penalty >= 0):
    raise ValueError(f'frequency penalty={penalty}: must be a finite number >= 0 (0 = none).')
  if export.kind == 'ar':
    run = sharded_decoder(export.model, layout.mesh, layout.rules, 'ar', gen_len=gen_len,
                          eos_id=eos_id)
    return Decoder('ar', 'ar', 1, gen_len, {'temperature': float(temperature)},
                   lambda prompts, key: run(export.params, prompts, key, temperature))
  k = export.k if k is None else int(k)
  if not 1 <= k <= export.k:
    raise ValueError(f'k={k}: the student in {export.directory} decodes 1..{export.k} tokens '
                     f'per step (k_max={export.k}).')
  run = sharded_decoder(export.model, layout.mesh, layout.rules, 'pflm', gen_len=gen_len, k=k,
                        freq_penalty=float(penalty), eos_id=eos_id)
  return Decoder(f'pflm_k{k}', 'pflm', k, gen_len, {'tau': 1.0, 'freq_penalty': float(penalty)},
                 lambda prompts, key: run(export.params, prompts, key, 1.0))


def prompt_ids(dec: Decoder, tokenizer, prompts: list[str]) -> list[list[int]]:
  """Every prompt's token ids, each checked against `dec` before anything compiles: at least k
  tokens (k-token decoding feeds the last k in its first step; the AR teacher needs one) and
  fewer than dec.gen_len (the total length, prompt included: at least one token to generate).
  Errors name the prompt by its 1-based number."""
  if not prompts:
    raise ValueError('no prompt given: pass --prompt="some text".')
  encoded = [tokenizer.encode(p) for p in prompts]
  for number, (text, ids) in enumerate(zip(prompts, encoded), 1):
    if len(ids) < dec.k:
      raise ValueError(f'prompt {number} ({text!r}) has {len(ids)} tokens; {dec.name} decoding '
                       f'needs at least {dec.k} (its first step feeds the last {dec.k} prompt '
                       'tokens): use a longer prompt.')
    if len(ids) >= dec.gen_len:
      raise ValueError(f'prompt {number} has {len(ids)} tokens but config.decode.gen_len='
                       f'{dec.gen_len} is the total length, prompt included: nothing to '
                       f'generate. Fix: --config.decode.gen_len={len(ids) + 1} or more, or a '
                       'shorter prompt.')
  return encoded


def decode_prompts(dec: Decoder, encoded: list[list[int]], key) -> list[np.ndarray]:
  """Each token-id prompt completed from its own length to dec.gen_len tokens (prompt included).

  Prompt i decodes as a batch of one with the noise key fold_in(key, i), so its tokens depend
  only on the model, the settings, its ids, `key` and i: never on how many other prompts there
  are or how long they are. One compiled loop per distinct prompt length; every decode is
  dispatched before the first is read back."""
  outputs = [dec(np.asarray([ids], np.int32), jax.random.fold_in(key, i))
             for i, ids in enumerate(encoded)]
  return [to_host(out)[0] for out in outputs]


def complete(dec: Decoder, tokenizer, prompts: list[str], key) -> list[str]:
  """Text in, text out: every prompt tokenized (`prompt_ids`), decoded by `decode_prompts`,
  detokenized (without the padding after EOS when `dec` was built with an eos_id)."""
  rows = decode_prompts(dec, prompt_ids(dec, tokenizer, prompts), key)
  return [tokenizer.decode([t for t in row if t != tokenizer.mask_id]) for row in rows]


def to_host(x) -> np.ndarray:
  """A decode output as one numpy array on every process (gathered when sharded across them)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _check_lengths(prefix_len: int, gen_len: int, k: int):
  if prefix_len < max(k, 1):
    raise ValueError(f'prompt length {prefix_len} is shorter than k={k}: k-token decoding feeds '
                     'the last k prompt tokens in its first step; use longer prompts.')
  if gen_len <= prefix_len:
    raise ValueError(f'gen_len={gen_len} must exceed the prompt length {prefix_len}.')
