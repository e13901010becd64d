"""Independent heads on the frozen AR teacher (Medusa / multi-token prediction): a baseline.

k tokens per teacher pass from one hidden state: slot 0 is the teacher's own next-token head,
slot i = 1..k-1 an extra head predicting token t+1+i from the teacher's final hidden state h_t
(before the final LN):

  h'_t,i = h_t + SiLU(h_t W_i + b_i)      logits_i = teacher's final LN + output head (h'_t,i)

W_i and b_i start at zero, so each head starts as the teacher's next-token head; the teacher
(its final LN and output head included) stays frozen. The heads are trained on the teacher's
own samples: a pool of AR completions of train-split prompts (sampled once, kept in the heads
directory), loss = the mean over heads of each head's mean cross-entropy against the sampled
token t+1+i, over the targets the teacher generated (prompt tokens are not targets).

Decoding, both with the shared noise of decode.py (u of output position j =
decode.position_uniforms(key, j)), so k = 1 is the AR teacher itself:

  heads_decode_loop   no verification: each pass feeds the last k emitted tokens to the teacher
                      and samples k tokens from the last position's hidden state (slot i by
                      inverse CDF with its own position's u). Lossy for k > 1.
  heads_verify_loop   lossless, Medusa-style fused draft + verify: one teacher pass per
                      iteration scores [pending token, k-1 head drafts]; the agreeing prefix
                      is accepted and the hidden state at its end gives the next pending token
                      (the teacher's own sample) and the next drafts. The output is
                      lossless.generate_ragged_ar's, token for token.

`run(config, workdir, k)` trains the heads for one k (resumable, loop.Loop) into
rundir.baseline_dir(workdir, f'heads_k{k}'); `load` reads them back.
"""

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from kforcing_jax import checkpoints, compare, data, decode, lossless, loop, progress
from kforcing_jax import provenance, ragged, rundir, sampling, sharding, train_state
from kforcing_jax.models import FunctionalModel
from kforcing_jax.models.backbone import BackboneConfig

POOL_FILE = 'pool.npz'
POOL_CHUNK = 64             # completions sampled per generate_ar call
HELD_OUT_FRACTION = 8       # 1/8 of the pool is the held-out set
# the optimizer fields heads training takes from config.distill (learning rate and warm-up
# are config.compare.heads' own)
OPTIMIZER_FIELDS = ('end_learning_rate_ratio', 'weight_decay', 'b1', 'b2', 'eps', 'grad_clip')


def dir_name(k: int) -> str:
  return f'heads_k{int(k)}'


@dataclasses.dataclass(frozen=True)
class HeadsModel:
  """num_heads extra heads on a teacher of architecture `cfg`: params {'w': (n, D, D),
  'b': (n, D)}. Duck-types FunctionalModel where the training state and sharding need it
  (param_shapes, logical_axes, init)."""
  cfg: BackboneConfig
  num_heads: int

  @property
  def param_shapes(self) -> dict:
    n, d = self.num_heads, self.cfg.d_model
    return {'w': jax.ShapeDtypeStruct((n, d, d), jnp.float32),
            'b': jax.ShapeDtypeStruct((n, d), jnp.float32)}

  @property
  def logical_axes(self) -> dict:
    return {'w': (None, 'embed', None), 'b': (None, None)}

  def init(self, rng: jax.Array) -> dict:
    """Zeros (rng unused): every head starts as the teacher's next-token head."""
    del rng
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self.param_shapes)

  def num_params(self) -> int:
    return sum(math.prod(s.shape) for s in jax.tree.leaves(self.param_shapes))


def heads_hidden(heads_params, hidden: jax.Array) -> jax.Array:
  """hidden (..., D) -> the heads' states (..., n, D) in float32: h + SiLU(h W_i + b_i)."""
  h = hidden.astype(jnp.float32)
  z = jnp.einsum('...d,nde->...ne', h, heads_params['w']) + heads_params['b']
  return h[..., None, :] + jax.nn.silu(z)


def heads_logits(backbone, heads_params, hidden: jax.Array) -> jax.Array:
  """hidden (..., D) of the teacher -> logits (..., n, V) of heads 1..n (the teacher's own
  final LN and output head on each head's state)."""
  return backbone.logits(heads_hidden(heads_params, hidden))


def teacher_hidden(backbone, tokens: jax.Array) -> jax.Array:
  """The teacher's final hidden states (B, S, D) before its final LN (a causal forward)."""
  x = backbone.embed_tokens(tokens)
  positions = jnp.arange(tokens.shape[1])[None, :]
  for layer in range(backbone.cfg.num_layers):
    x, _ = backbone.context_layer(layer, x, positions)
  return x


# ----------------------------------------------------------------------------- training

def target_weights(seq_len: int, num_heads: int, prompt_len: int) -> jax.Array:
  """(S, n) weight of head i (1-based) at position t: its target t+1+i is a generated token
  (>= prompt_len) inside the row."""
  target = jnp.arange(seq_len)[:, None] + 1 + jnp.arange(1, num_heads + 1)[None, :]
  return ((target >= prompt_len) & (target < seq_len)).astype(jnp.float32)


def heads_counts(teacher: FunctionalModel, teacher_params, heads_params, tokens, prompt_len: int):
  """Per head: (summed NLL (n,), correct top-1 (n,), target count (n,)) over a batch of pool
  rows (B, S)."""
  backbone = teacher.module(teacher_params)
  hidden = jax.lax.stop_gradient(teacher_hidden(backbone, tokens))
  n = heads_params['w'].shape[0]
  logits = heads_logits(backbone, heads_params, hidden)                  # (B, S, n, V)
  seq_len = tokens.shape[1]
  # target of head i (0-based slot i -> head i+1) at t: token t+2+i, clipped where unweighted
  idx = jnp.minimum(jnp.arange(seq_len)[:, None] + 2 + jnp.arange(n)[None, :], seq_len - 1)
  targets = tokens[:, idx]                                               # (B, S, n)
  w = jnp.broadcast_to(target_weights(seq_len, n, prompt_len), targets.shape)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return (jnp.einsum('bsn,bsn->n', nll, w), jnp.einsum('bsn,bsn->n', correct, w),
          jnp.sum(w, axis=(0, 1)))


def heads_loss(teacher: FunctionalModel, prompt_len: int, heads_params, batch, teacher_params):
  """The mean over heads of each head's mean cross-entropy; metrics per head (loss_i, acc_i,
  i = 1-based head) and the target count ('tokens')."""
  nll, correct, count = heads_counts(teacher, teacher_params, heads_params, batch['tokens'],
                                     prompt_len)
  per_head = nll / jnp.maximum(count, 1.0)
  metrics = {'tokens': jnp.sum(count)}
  for i in range(per_head.shape[0]):
    metrics[f'loss_{i + 1}'] = per_head[i]
    metrics[f'acc_{i + 1}'] = correct[i] / jnp.maximum(count[i], 1.0)
  return jnp.mean(per_head), metrics


def optimizer_config(config) -> ml_collections.ConfigDict:
  """config.distill's optimizer with config.compare.heads' learning rate and warm-up."""
  hc = config.compare.heads
  oc = ml_collections.ConfigDict({f: config.distill[f] for f in OPTIMIZER_FIELDS
                                  if f in config.distill})
  oc.learning_rate = hc.learning_rate
  oc.warmup_steps = hc.warmup_steps
  return oc


def budget_steps(config) -> int:
  """compare.heads.steps, or (0) the distillation's token budget at the heads' batch shape
  (the rule of compare.budgets, the one place budgets are set)."""
  return compare.budgets(config)['heads']['steps']


def train_program(config, layout: sharding.Layout, teacher: FunctionalModel, k: int,
                  steps: int) -> train_state.Program:
  """The jitted step(state, batch, teacher_params) of the k-1 heads on `layout`."""
  hc = config.compare.heads
  heads = HeadsModel(teacher.cfg, k - 1)
  optimizer = train_state.make_optimizer(optimizer_config(config), steps)
  abstract = train_state.abstract_train_state(heads, optimizer, layout.mesh, layout.rules)
  shape = (hc.batch_size, hc.seq_len)
  batch = layout.abstract_batch({'tokens': (shape, jnp.int32)})
  extra = (layout.abstract_params(teacher),)
  prompt_len = config.decode.prefix_len
  step = train_state.make_train_step(
      lambda p, b, t: heads_loss(teacher, prompt_len, p, b, t), optimizer, abstract,
      {name: x.sharding for name, x in batch.items()}, layout.mesh, layout.rules,
      extra_args_shardings=tuple(jax.tree.map(lambda x: x.sharding, e) for e in extra))
  return train_state.Program(heads, optimizer, abstract, batch, extra, step)


def sample_pool(config, teacher: FunctionalModel, teacher_params, layout: sharding.Layout,
                tokenizer=None) -> np.ndarray:
  """(pool_samples, heads.seq_len) AR completions at temperature 1 of the first
  decode.prefix_len tokens of train rows (shuffled order, seed compare.heads.seed)."""
  hc = config.compare.heads
  prompt_len = config.decode.prefix_len
  if not 1 <= prompt_len < hc.seq_len:
    raise ValueError(f'decode.prefix_len={prompt_len} must be in [1, compare.heads.seq_len='
                     f'{hc.seq_len}).')
  chunk = min(POOL_CHUNK, hc.pool_samples)
  rows_at = data.global_batches(config, layout, 'train', chunk, True, tokenizer)
  key = jax.random.key(hc.seed)
  out = []
  for i in range(-(-hc.pool_samples // chunk)):
    prompts = rows_at(i)['tokens'][:, :prompt_len]
    out.append(np.asarray(decode.generate_ar(teacher, teacher_params, prompts,
                                             jax.random.fold_in(key, i), 1.0,
                                             gen_len=hc.seq_len)))
  return np.concatenate(out)[:hc.pool_samples]


def read_pool(out_dir: str) -> tuple[np.ndarray, str]:
  """(completions, fingerprint of the teacher that sampled them) of the pool a heads run in
  `out_dir` trained on."""
  with (epath.Path(out_dir) / POOL_FILE).open('rb') as f:
    stored = np.load(f)
    return stored['tokens'], str(stored['teacher_fingerprint'])


def load_or_sample_pool(config, out_dir: str, teacher, teacher_params, layout,
                        tokenizer) -> np.ndarray:
  """The pool saved in `out_dir` (a resumed run trains on the same samples), sampled and saved
  when missing. A pool sampled from another teacher (it records the teacher's fingerprint)
  means the whole directory is stale: refused, since its checkpoints would resume on it too."""
  path = epath.Path(out_dir) / POOL_FILE
  hc = config.compare.heads
  fingerprint = provenance.params_fingerprint(teacher_params)
  if path.exists():
    pool, made_from = read_pool(out_dir)
    if made_from != fingerprint:
      raise ValueError(f'{path} was sampled from a different teacher (fingerprint {made_from}, '
                       f'the teacher now has {fingerprint}): delete {out_dir} to retrain these '
                       'heads on the current teacher.')
    if pool.shape != (hc.pool_samples, hc.seq_len):
      raise ValueError(f'{path} holds {pool.shape} samples but compare.heads asks for '
                       f'{(hc.pool_samples, hc.seq_len)}: use the original settings or delete '
                       f'{out_dir}.')
    return pool
  t0 = time.time()
  pool = sample_pool(config, teacher, teacher_params, layout, tokenizer)
  progress.log(f'[heads] sampled {pool.shape[0]} teacher completions of {pool.shape[1]} tokens '
               f'in {time.time() - t0:.0f}s')
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open('wb') as f:
      np.savez(f, tokens=pool, prompt_len=config.decode.prefix_len, teacher_fingerprint=fingerprint)
  return pool


def split_pool(pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(train rows, held-out rows): the last 1/8 (at least one row) is held out."""
  held = max(1, pool.shape[0] // HELD_OUT_FRACTION)
  if held >= pool.shape[0]:
    raise ValueError(f'a pool of {pool.shape[0]} samples leaves nothing to train on; raise '
                     'compare.heads.pool_samples.')
  return pool[:-held], pool[-held:]


def pool_batches(rows: np.ndarray, batch_size: int, seed: int):
  """step -> {'tokens': (batch_size, S)}: epochs of seeded permutations of `rows` (a pure
  function of the step, so a resumed run sees the same data)."""
  n = rows.shape[0]

  def batch_at(step: int) -> dict:
    flat = step * batch_size + np.arange(batch_size)
    epochs = flat // n
    perms = {e: np.random.default_rng([seed, int(e)]).permutation(n) for e in np.unique(epochs)}
    idx = np.array([perms[e][i] for e, i in zip(epochs, flat % n)])
    return {'tokens': rows[idx].astype(np.int32)}

  return batch_at


def make_eval_fn(teacher: FunctionalModel, teacher_params, layout, rows: np.ndarray,
                 batch_size: int, prompt_len: int):
  """state -> held-out per-head loss and top-1 accuracy (val_loss_i, val_acc_i, val_loss)."""
  counts = jax.jit(lambda hp, tp, tokens: heads_counts(teacher, tp, hp, tokens, prompt_len))
  batches = [rows[i:i + batch_size] for i in range(0, rows.shape[0], batch_size)]

  def evaluate(state):
    total = None
    for tokens in batches:
      with sharding.use_mesh_rules(layout.mesh, layout.rules):
        got = [np.asarray(x) for x in counts(state['params'], teacher_params,
                                             jnp.asarray(tokens, jnp.int32))]
      total = got if total is None else [a + b for a, b in zip(total, got)]
    nll, correct, count = total
    count = np.maximum(count, 1.0)
    out = {}
    for i in range(nll.shape[0]):
      out[f'val_loss_{i + 1}'] = float(nll[i] / count[i])
      out[f'val_acc_{i + 1}'] = float(correct[i] / count[i])
    out['val_loss'] = float(np.mean(nll / count))
    return out

  return evaluate


def run(config, workdir: str, k: int) -> dict:
  """Train (or resume) the k-1 heads on workdir's teacher; returns the eval.json contents
  (held-out per-head accuracy, steps, tokens, seconds). Skipped when eval.json exists."""
  if k < 2:
    raise ValueError(f'k={k}: heads decode k >= 2 tokens per pass (k = 1 is the teacher).')
  out_dir = rundir.baseline_dir(workdir, dir_name(k))
  done = rundir.trained(out_dir, f'heads k={k}')
  if done is not None:
    return done
  t0 = time.time()
  hc = config.compare.heads
  tokenizer = data.prepared_tokenizer(config)
  layout = sharding.layout_from_config(config)
  teacher = rundir.load_export(rundir.teacher_dir(workdir), layout, kind='ar', config=config,
                               tokenizer=tokenizer)
  steps = budget_steps(config)
  program = train_program(config, layout, teacher.model, k, steps)
  heads = program.model
  pool = load_or_sample_pool(config, out_dir, teacher.model, teacher.params, layout, tokenizer)
  train_rows, held_out = split_pool(pool)
  batch_at = pool_batches(train_rows, hc.batch_size, hc.seed)
  init = train_state.make_init_state(heads, program.optimizer, program.abstract_state)
  made_from = {provenance.TEACHER_KEY: provenance.params_fingerprint(teacher.params),
               provenance.TEACHER_DIR_KEY: rundir.TEACHER}
  dc = config.distill
  state, eval_metrics = loop.run(loop.Loop(
      name=f'heads k={k}', workdir=out_dir, total_steps=steps,
      init_state=lambda: init(jax.random.key(hc.seed)), abstract_state=program.abstract_state,
      train_step=lambda s, b: program.step(s, b, teacher.params),
      batch_at=lambda step: layout.global_batch(batch_at(step)),
      evaluate=make_eval_fn(teacher.model, teacher.params, layout, held_out, hc.batch_size,
                            config.decode.prefix_len),
      log_every=hc.get('log_every', dc.log_every), eval_every=hc.get('eval_every', dc.eval_every),
      checkpoint_every=hc.get('checkpoint_every', dc.checkpoint_every),
      keep_checkpoints=hc.get('keep_checkpoints', dc.keep_checkpoints),
      meta={'kind': 'heads', 'k': k, **made_from}, config_record=provenance.run_record(config)))
  checkpoints.export_params(rundir.params_dir(out_dir), state['params'],
                            {'kind': 'heads', 'k': k, 'steps': steps, **made_from,
                             provenance.PARAMS_KEY: provenance.params_fingerprint(state['params']),
                             provenance.TOKENIZER_KEY: provenance.tokenizer_fingerprint(tokenizer)})
  result = dict(eval_metrics, k=k, steps=steps, tokens=steps * hc.batch_size * hc.seq_len,
                pool_samples=int(pool.shape[0]), held_out=int(held_out.shape[0]),
                params=heads.num_params(), seconds=time.time() - t0)
  progress.write_json(rundir.eval_path(out_dir), result)
  accs = ', '.join(f'{result[f"val_acc_{i}"]:.3f}' for i in range(1, k))
  progress.log(f'[heads k={k}] held-out top-1 per head {accs} -> {rundir.eval_path(out_dir)}')
  return result


def load(config, workdir: str, k: int, layout: sharding.Layout, tokenizer=None):
  """(HeadsModel, params) of workdir's trained k-token heads, on `layout`."""
  teacher = rundir.load_export(rundir.teacher_dir(workdir), layout, kind='ar', config=config,
                               tokenizer=tokenizer)
  heads = HeadsModel(teacher.model.cfg, k - 1)
  directory = rundir.baseline_dir(workdir, dir_name(k))
  params, meta = rundir.load_tree(directory, layout.abstract_params(heads))
  if meta.get('kind') != 'heads' or int(meta.get('k', -1)) != k:
    raise ValueError(f'{rundir.params_dir(directory)} is not a k={k} heads export (meta '
                     f'kind={meta.get("kind")!r}, k={meta.get("k")!r}).')
  recorded = meta.get(provenance.TEACHER_KEY)
  if recorded is not None and recorded != provenance.params_fingerprint(teacher.params):
    raise ValueError(f'{directory} was trained on a different teacher (fingerprint {recorded}); '
                     'retrain the heads (delete the directory and run `make compare`).')
  return heads, params


# ----------------------------------------------------------------------------- decoding

def _check_heads(heads: HeadsModel, k: int) -> None:
  if k < 1 or k - 1 > heads.num_heads:
    raise ValueError(f'k={k}: these heads decode 1..{heads.num_heads + 1} tokens per pass.')


def _sample_slots(backbone, heads_params, hidden, u, temperature, k: int):
  """hidden (B, D) at position p -> k tokens (B, k) for positions p+1..p+k: slot 0 from the
  teacher's head, slot i from head i, each by inverse CDF with its position's u (B, k)."""
  order = backbone.cfg.cdf_order
  first = sampling.inverse_cdf_sample(backbone.logits(hidden), u[:, 0], temperature, order)
  if k == 1:
    return first[:, None]
  params = jax.tree.map(lambda x: x[:k - 1], heads_params)
  drafts = sampling.inverse_cdf_sample(heads_logits(backbone, params, hidden), u[:, 1:],
                                       temperature[:, None], order)
  return jnp.concatenate([first[:, None], drafts], axis=1)


def heads_decode_loop(teacher: FunctionalModel, teacher_params, heads: HeadsModel, heads_params,
                      prompts, key, temperature=1.0, *, gen_len: int, k: int) -> jax.Array:
  """k tokens per teacher pass, unverified. prompts (B, P), P >= k -> tokens (B, gen_len).

  Each pass feeds the k tokens emitted by the previous pass (the prompt's last k at first)
  and samples the next k from the last slot's hidden state. k = 1 is decode.ar_decode_loop
  (same steps, same cache length, same noise). No EOS stopping."""
  _check_heads(heads, k)
  backbone = teacher.module(teacher_params)
  cfg = backbone.cfg
  batch, plen = prompts.shape
  decode._check_lengths(plen, gen_len, k)  # noqa: SLF001 (the decoders' one length rule)
  tokens = jnp.full((batch, gen_len + k), cfg.mask_id, jnp.int32).at[:, :plen].set(prompts)
  # a window writes positions < gen_len - 1 (it runs while start + k < gen_len): the AR
  # loop's cache length, which keeps k = 1 its exact twin
  cache = decode.prefill(backbone, decode.init_cache(cfg, batch, gen_len), prompts[:, :plen - k])
  temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (batch,))

  def body(state):
    start, tokens, cache = state
    pending = jax.lax.dynamic_slice_in_dim(tokens, start, k, axis=1)
    hidden, cache = decode.window_step(backbone, cache, start, backbone.embed_tokens(pending),
                                       start + jnp.arange(k), k)
    u = decode.position_uniforms(key, start + k + jnp.arange(k), batch)
    new = _sample_slots(backbone, heads_params, hidden[:, -1], u, temperature, k)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, new, start + k, axis=1)
    return start + k, tokens, cache

  def cond(state):
    return state[0] + k < gen_len

  _, tokens, _ = jax.lax.while_loop(cond, body, (jnp.asarray(plen - k, jnp.int32), tokens, cache))
  return tokens[:, :gen_len]


def heads_verify_loop(teacher: FunctionalModel, teacher_params, heads: HeadsModel, heads_params,
                      prompts, prompt_lens, key, temperature=1.0, *, gen_len: int,
                      k: int) -> dict:
  """Lossless k-token decoding of ragged prompts (B, P), row b's first prompt_lens[b] real.

  A row's state: position p of its *pending* token (the teacher's own sample for p, not yet
  cached; everything before p final and cached) and k-1 head drafts for p+1..p+k-1, all made
  from the hidden state at p-1 with the shared noise. One iteration is one teacher pass:

    verify  window [pending, drafts] at p..p+k-1 -> own_j = the teacher's sample for p+1+j
    accept  a = agreeing prefix of drafts vs own_0..own_{k-2}, in 0..k-1; the row gets the
            drafts d_1..d_a and own_a, its new pending token at p' = p+a+1 (a+1 tokens)
    draft   the hidden state of slot a (position p'-1) gives the next k-1 drafts by the heads

  The first pending token and drafts come from a one-slot pass at the prompt's last token, as
  lossless.generate_ragged_ar's first step. Returns lossless.verify_loop's keys: 'tokens'
  (B, gen_len); 'accepted_histogram' (k,): (row, pass) pairs that accepted a = 0..k-1 drafts,
  the first pass counted as a = 0; 'iterations': teacher passes, the first included;
  'mean_tokens_per_iteration': tokens a row gains per pass. Prompts need >= 1 token."""
  _check_heads(heads, k)
  if not isinstance(prompt_lens, jax.core.Tracer):
    lossless.check_prompt_lengths(prompt_lens, prompts.shape[1], gen_len, 0)
  tb = teacher.module(teacher_params)
  cfg = tb.cfg
  batch, width = prompts.shape
  # furthest reach: a stopped row (p <= gen_len - 2 + k) keeps writing k+1 tokens at p and
  # reading noise up to p+2k-1
  buf = gen_len + 2 * k + 1
  prompt_lens = jnp.asarray(prompt_lens, jnp.int32)
  temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (batch,))
  all_u = decode.position_uniforms(key, jnp.arange(buf + k), batch)
  cache = ragged.prefill(tb, ragged.init_cache(cfg, batch, buf), prompts)
  tokens = jnp.full((batch, buf), cfg.mask_id, jnp.int32).at[:, :width].set(prompts)

  def slots_from(hidden, p):
    """Pending token for p and drafts for p+1..p+k-1 from the hidden state at p-1."""
    return _sample_slots(tb, heads_params, hidden, ragged.read_rows(all_u, p, k), temperature, k)

  last = ragged.read_rows(tokens, prompt_lens - 1, 1)
  hidden, cache = ragged.window_pass(tb, cache, tb.embed_tokens(last), prompt_lens - 1, 1)
  window = slots_from(hidden[:, 0], prompt_lens)
  tokens = ragged.write_rows(tokens, window[:, :1], prompt_lens)
  histogram = jnp.zeros((k,), jnp.int32).at[0].set(batch)

  def body(state):
    p, tokens, cache, window, histogram, iterations = state
    active = p < gen_len - 1
    hidden, cache = ragged.window_pass(tb, cache, tb.embed_tokens(window), p, k)
    own = sampling.inverse_cdf_sample(tb.logits(hidden), ragged.read_rows(all_u, p + 1, k),
                                      temperature[:, None], cfg.cdf_order)
    accepted = lossless.accept_length(window[:, 1:], own)
    # p+1..p+a are the accepted drafts (= own_0..own_{a-1}), p+a+1 the teacher's own_a; later
    # slots are overwritten by later passes or lie past the output
    tokens = ragged.write_rows(tokens, own, p + 1)
    p_next = p + accepted + 1
    h_last = ragged.read_rows(hidden, accepted, 1)[:, 0]
    window = slots_from(h_last, p_next)
    histogram = histogram + jnp.sum(
        jax.nn.one_hot(accepted, k, dtype=jnp.int32) * active[:, None], axis=0)
    p = jnp.where(active, p_next, p)
    return p, tokens, cache, window, histogram, iterations + 1

  def cond(state):
    return jnp.any(state[0] < gen_len - 1)

  state = (prompt_lens, tokens, cache, window, histogram, jnp.ones((), jnp.int32))
  _, tokens, _, _, histogram, iterations = jax.lax.while_loop(cond, body, state)
  pairs = jnp.maximum(jnp.sum(histogram), 1)
  mean_tokens = jnp.sum(histogram * (jnp.arange(k) + 1)) / pairs
  return {'tokens': tokens[:, :gen_len], 'accepted_histogram': histogram,
          'iterations': iterations, 'mean_tokens_per_iteration': mean_tokens}


generate_heads = jax.jit(heads_decode_loop, static_argnames=('teacher', 'heads', 'gen_len', 'k'))
generate_heads_verified = jax.jit(heads_verify_loop,
                                  static_argnames=('teacher', 'heads', 'gen_len', 'k'))
