"""A masked diffusion LM (absorbing state, MDLM-style) of the teacher's size (issue 15).

The denoiser is the AR teacher's architecture and parameter tree (a Backbone) run with
bidirectional attention: `denoiser_logits` reuses the Backbone's blocks (project_qkv, finish)
and its output head around a full softmax, so an export is exactly a Backbone tree that
`rundir.load_export(..., kind='ar')` loads, and init 'from_teacher' starts from the AR weights.

There is no time conditioning: with the absorbing (mask) state, the posterior of a masked
token given the partially masked sequence does not depend on t (MDLM, Sahoo et al. 2024,
s.3.3), so the network only has to see which positions are masked, and the mask id
(cfg.mask_id, reserved: its logit is forced to -1000, so it is never sampled) says that.

Training (`mdlm_loss`): the continuous-time ELBO with the linear schedule alpha_t = 1 - t. Per
row t ~ U(eps, 1), stratified over the batch; each real token is masked independently with
probability t; the loss is the cross-entropy on masked positions weighted 1/t, summed and
divided by the number of real tokens: an upper bound on the data's NLL per token.

Decoding (`mdlm_decode_loop` / `generate_mdlm`): the L = gen_len - P positions after the prompt
start masked; T denoising steps each unmask a fixed number of still-masked positions (step s:
floor(L(s+1)/T) - floor(Ls/T)) in a per-row random order, each sampled (inverse CDF) from the
denoiser's distribution given the current sequence: one full bidirectional forward per step,
no KV cache. A uniformly random order is what the forward process implies: every position is
masked independently with the same probability, so the order tokens are revealed in reverse
is a uniform permutation.

`run(config, workdir)` trains (resumable) in rundir.baseline_dir(workdir, 'mdlm').
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax import checkpoints, compare, data, decode, distributed, loop, models
from kforcing_jax import progress, provenance, rundir, sampling, sharding, train_state
from kforcing_jax.models import FunctionalModel
from kforcing_jax.models.attention import NEG_INF
from kforcing_jax.models.backbone import rematerialized

NAME = 'mdlm'
# the smallest masking rate trained on: the 1/t weight is unbounded as t -> 0
T_EPS = 1e-3
# fixed masking rates of the held-out masked-token accuracy in eval.json
EVAL_MASK_RATES = (0.15, 0.5, 0.9)
# seed offset of the held-out noise (apart from any training step's)
VALIDATION_SEED_OFFSET = 7919


# ----------------------------------------------------------------------------- the denoiser

def bidirectional_attention(q, k, v, key_mask=None):
  """Full softmax attention. q, k, v: (B, S, H, Dh); key_mask (B, S) bool: keys seen
  (data padding is hidden from every query). Returns (B, S, H, Dh)."""
  scale = q.shape[-1] ** -0.5
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32) * scale
  if key_mask is not None:
    scores = jnp.where(key_mask[:, None, None, :], scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', probs, v)


def denoiser_logits(model: FunctionalModel, params, tokens, key_mask=None):
  """(B, S) partially masked tokens -> (B, S, V) logits of the clean tokens, every position
  attending to every (key_mask-visible) position. Same parameters as the AR Backbone."""
  backbone = model.module(params)
  positions = jnp.arange(tokens.shape[1])[None, :]

  def layer(i, x):
    block = backbone.blocks[i]
    q, k, v = block.project_qkv(x, positions)
    return block.finish(x, bidirectional_attention(q, k, v, key_mask))

  x = backbone.embed_tokens(tokens)
  for i in range(backbone.cfg.num_layers):
    x = rematerialized(backbone.cfg, lambda h, i=i: layer(i, h))(x)
  return backbone.logits(x)


# ----------------------------------------------------------------------------- training

def stratified_times(rng: np.random.Generator, batch: int, eps: float = T_EPS) -> np.ndarray:
  """(batch,) t in [eps, 1): one shared offset plus i / batch (mod 1), so every batch covers
  the unit interval evenly (lower-variance ELBO than iid t), each t still marginally uniform."""
  u = (rng.random(dtype=np.float32) + np.arange(batch, dtype=np.float32) / batch) % 1.0
  return (eps + (1.0 - eps) * u).astype(np.float32)


def masking_noise(seed: int, step: int, batch: int, seq_len: int) -> dict:
  """The noise of one global batch: t (B,) and per-token uniforms r (B, S); token (b, i) is
  masked where r < t. A pure function of (seed, step), so a resume sees the same masks."""
  rng = np.random.default_rng([seed, step])
  t = stratified_times(rng, batch)
  return {'t': t, 'r': rng.random((batch, seq_len), dtype=np.float32)}


def corrupt(tokens, real, r, rate, mask_id: int):
  """Masks real tokens where r < rate (rate broadcasts over rows): (noisy tokens, masked)."""
  masked = (r < rate) & real
  return jnp.where(masked, mask_id, tokens), masked


def masked_nll(model: FunctionalModel, params, batch, rate):
  """Per-token cross-entropy (B, S), masked positions (B, S) and argmax hits (B, S) when the
  real tokens of `batch` are masked at `rate` ((B, 1) or a scalar) with its uniforms r."""
  real = batch['mask'] > 0
  noisy, masked = corrupt(batch['tokens'], real, batch['r'], rate, model.cfg.mask_id)
  logits = denoiser_logits(model, params, noisy, real)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, batch['tokens'][..., None], axis=-1)[..., 0]
  hits = jnp.argmax(logits, axis=-1) == batch['tokens']
  return nll, masked, hits


def mdlm_loss(model: FunctionalModel, params, batch):
  """The continuous-time ELBO per real token (alpha_t = 1 - t: weight 1/t on masked CE)."""
  t = batch['t'][:, None]
  nll, masked, hits = masked_nll(model, params, batch, t)
  m = masked.astype(jnp.float32)
  tokens = jnp.sum(batch['mask'] > 0).astype(jnp.float32)
  loss = jnp.sum(nll * m / t) / jnp.maximum(tokens, 1.0)
  accuracy = jnp.sum(hits * m) / jnp.maximum(jnp.sum(m), 1.0)
  return loss, {'tokens': tokens, 'masked_accuracy': accuracy, 'masked_share': jnp.sum(m) /
                jnp.maximum(tokens, 1.0)}


def training_steps(config) -> int:
  """compare.mdlm.steps, or (0) the teacher's + the distillation's tokens at mdlm's batch
  (the rule of compare.budgets, the one place budgets are set)."""
  return compare.budgets(config)['mdlm']['steps']


def optimizer_config(config):
  """config.train's optimizer with compare.mdlm's learning rate and warm-up."""
  tc = config.train.copy_and_resolve_references()
  with tc.unlocked():
    tc.learning_rate = config.compare.mdlm.learning_rate
    tc.warmup_steps = config.compare.mdlm.warmup_steps
  return tc


def train_program(config, layout: sharding.Layout, steps: int) -> train_state.Program:
  """The denoiser's jitted train step on `layout` (batch: tokens, mask, t, r)."""
  model = models.teacher(config)
  optimizer = train_state.make_optimizer(optimizer_config(config), steps)
  abstract = train_state.abstract_train_state(model, optimizer, layout.mesh, layout.rules)
  shape = (config.compare.mdlm.batch_size, config.data.seq_len)
  batch = layout.abstract_batch({'tokens': (shape, jnp.int32), 'mask': (shape, jnp.float32),
                                 't': (shape[:1], jnp.float32), 'r': (shape, jnp.float32)})
  step = train_state.make_train_step(
      lambda p, b: mdlm_loss(model, p, b), optimizer, abstract,
      {name: x.sharding for name, x in batch.items()}, layout.mesh, layout.rules,
      microbatches=config.train.microbatches, weight_key='tokens')
  return train_state.Program(model, optimizer, abstract, batch, (), step)


def noisy_batches(config, layout: sharding.Layout, split: str, shuffle: bool, seed: int,
                  tokenizer=None):
  """step -> the global batch {tokens, mask} of `split` plus its masking noise {t, r}."""
  b, n = config.compare.mdlm.batch_size, config.data.seq_len
  tokens_at = data.global_batches(config, layout, split, b, shuffle, tokenizer)
  block, blocks = distributed.local_batch_rows(layout.mesh, layout.rules, b)
  rows = slice(block * b // blocks, (block + 1) * b // blocks)

  def batch_at(step):
    noise = masking_noise(seed, step, b, n)
    return dict(tokens_at(step), **layout.global_batch({k: v[rows] for k, v in noise.items()}))
  return batch_at


def make_eval_fn(model: FunctionalModel, layout: sharding.Layout, batches):
  """state -> held-out ELBO (per real token; val_ppl_bound = exp of it, an upper bound on the
  denoiser's perplexity of the whole row) and masked-token accuracy at EVAL_MASK_RATES."""
  @jax.jit
  def sums(params, batch):
    with sharding.use_mesh_rules(layout.mesh, layout.rules):
      t = batch['t'][:, None]
      nll, masked, _ = masked_nll(model, params, batch, t)
      out = [jnp.sum(nll * masked / t), jnp.sum(batch['mask'] > 0)]
      for rate in EVAL_MASK_RATES:
        _, masked, hits = masked_nll(model, params, batch, rate)
        out += [jnp.sum(hits & masked), jnp.sum(masked)]
    return out

  def evaluate(state):
    totals = np.zeros(2 + 2 * len(EVAL_MASK_RATES))
    for batch in batches:
      totals += np.asarray([float(x) for x in jax.device_get(sums(state['params'], batch))])
    elbo = totals[0] / max(totals[1], 1.0)
    out = {'val_elbo_nll': float(elbo), 'val_ppl_bound': float(np.exp(elbo))}
    for i, rate in enumerate(EVAL_MASK_RATES):
      hits, count = totals[2 + 2 * i], totals[3 + 2 * i]
      out[f'val_masked_acc_{rate}'] = float(hits / max(count, 1.0))
    return out

  return evaluate


def run(config, workdir: str) -> dict:
  """Train (or resume) the MDLM baseline; returns the eval.json contents. Skipped when
  eval.json exists."""
  mc = config.compare.mdlm
  if mc.init not in ('scratch', 'from_teacher'):
    raise ValueError(f"compare.mdlm.init={mc.init!r}; expected 'scratch' or 'from_teacher'.")
  out_dir = rundir.baseline_dir(workdir, NAME)
  done = rundir.trained(out_dir, 'mdlm')
  if done is not None:
    return done
  t0 = time.time()
  tokenizer = data.prepared_tokenizer(config)
  layout = sharding.layout_from_config(config)
  steps = training_steps(config)
  program = train_program(config, layout, steps)
  model = program.model
  n_params = model.num_params()
  made_from = {}
  if mc.init == 'from_teacher':
    teacher = rundir.load_export(rundir.teacher_dir(workdir), layout, kind='ar', config=config,
                                 tokenizer=tokenizer)
    made_from = {provenance.TEACHER_KEY: provenance.params_fingerprint(teacher.params)}
    # a copy: the train step donates the state, which must not free the teacher's buffers
    from_params = jax.jit(
        lambda p: {'step': jnp.zeros((), jnp.int32), 'params': jax.tree.map(jnp.copy, p),
                   'opt_state': program.optimizer.init(p)},
        out_shardings=train_state.shardings_of(program.abstract_state))
    init_state = lambda: from_params(teacher.params)  # noqa: E731
  else:
    init = train_state.make_init_state(model, program.optimizer, program.abstract_state)
    init_state = lambda: init(jax.random.key(mc.seed))  # noqa: E731
  tc = config.train
  val_at = noisy_batches(config, layout, 'validation', False,
                         mc.seed + VALIDATION_SEED_OFFSET, tokenizer)
  state, eval_metrics = loop.run(loop.Loop(
      name='MDLM', workdir=out_dir, total_steps=steps, init_state=init_state,
      abstract_state=program.abstract_state, train_step=program.step,
      batch_at=noisy_batches(config, layout, 'train', True, mc.seed, tokenizer),
      evaluate=make_eval_fn(model, layout, [val_at(i) for i in range(tc.eval_batches)]),
      log_every=tc.log_every, eval_every=tc.eval_every,
      checkpoint_every=tc.checkpoint_every, keep_checkpoints=tc.keep_checkpoints,
      meta={'kind': NAME, 'init': mc.init, **made_from},
      config_record=provenance.run_record(config)))
  checkpoints.export_params(rundir.params_dir(out_dir), state['params'],
                            {'kind': NAME, 'init': mc.init, 'steps': steps, **made_from,
                             provenance.PARAMS_KEY: provenance.params_fingerprint(state['params']),
                             provenance.TOKENIZER_KEY: provenance.tokenizer_fingerprint(tokenizer)})
  tokens = steps * mc.batch_size * config.data.seq_len
  result = dict(eval_metrics, params=n_params, init=mc.init, train_steps=steps,
                train_tokens=tokens, seconds=time.time() - t0)
  progress.write_json(rundir.eval_path(out_dir), result)
  progress.log(f'[mdlm] val_ppl_bound {result["val_ppl_bound"]:.2f}, masked acc at 0.5 '
               f'{result["val_masked_acc_0.5"]:.3f} -> {rundir.eval_path(out_dir)}')
  return result


# ----------------------------------------------------------------------------- decoding

def unmask_ranks(key: jax.Array, batch: int, length: int) -> jax.Array:
  """(batch, length) int32: rank[b, j] = the place of generated position j in row b's
  uniformly random unmasking order (a permutation of 0..length-1 per row)."""
  order = jax.vmap(lambda k: jax.random.permutation(k, length))(jax.random.split(key, batch))
  return jnp.argsort(order, axis=-1).astype(jnp.int32)


def unmasked_by(step, length: int, steps: int):
  """Positions unmasked after `step` steps (of `steps`): floor(length * step / steps)."""
  return (length * step) // steps


def mdlm_decode_loop(model: FunctionalModel, params, prompts, key, temperature=1.0, *,
                     gen_len: int, steps: int, return_trace: bool = False):
  """prompts (B, P) -> tokens (B, gen_len), prompt included, after `steps` denoising steps.

  Step s unmasks the still-masked positions whose rank (`unmask_ranks`) is in
  [floor(Ls/T), floor(L(s+1)/T)), each the inverse-CDF sample at `temperature` of the
  denoiser's distribution given the current sequence, with its own uniform (one per position,
  decode.position_uniforms). With return_trace also (B, steps): positions unmasked per step.
  """
  cfg = model.cfg
  batch, plen = prompts.shape
  length = gen_len - plen
  if not 1 <= steps <= length:
    raise ValueError(f'MDLM decoding needs 1 <= steps <= gen_len - prompt length = {length} '
                     f'(got steps={steps}).')
  order_key, sample_key = jax.random.split(key)  # the order, then every position's uniform
  ranks = jnp.concatenate([jnp.full((batch, plen), -1, jnp.int32),
                           unmask_ranks(order_key, batch, length)], axis=1)
  u = decode.position_uniforms(sample_key, jnp.arange(gen_len), batch)
  temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (batch,))
  tokens = jnp.full((batch, gen_len), cfg.mask_id, jnp.int32).at[:, :plen].set(prompts)

  def body(s, carry):
    tokens, trace = carry
    logits = denoiser_logits(model, params, tokens)
    sampled = sampling.inverse_cdf_sample(logits, u, temperature[:, None], cfg.cdf_order)
    now = ((ranks >= unmasked_by(s, length, steps))
           & (ranks < unmasked_by(s + 1, length, steps)))
    trace = trace.at[:, s].set(jnp.sum(now & (tokens == cfg.mask_id), axis=1))
    return jnp.where(now, sampled, tokens), trace

  tokens, trace = jax.lax.fori_loop(0, steps, body,
                                    (tokens, jnp.zeros((batch, steps), jnp.int32)))
  return (tokens, trace) if return_trace else tokens


generate_mdlm = jax.jit(mdlm_decode_loop,
                        static_argnames=('model', 'gen_len', 'steps', 'return_trace'))
