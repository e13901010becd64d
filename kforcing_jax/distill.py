"""Progressive self-forcing distillation: AR teacher -> k=1 -> k=2 -> k=4 (METHOD.md s.4).

`run(config, workdir, only_stage=None)` runs every stage of `config.distill.stages` (or one),
each initialised from the previous stage's params (stage 1 from the AR teacher), each
resumable, each writing its stage directory (rundir.stage_dir) with checkpoints/, params/,
metrics.jsonl, TensorBoard events, config.json and eval.json. Checkpoints and export record the
fingerprint of the teacher the stage was made from; a stage whose teacher has changed since is
set aside and rebuilt, never resumed or reused (`set_aside_if_stale`).

Stage targets (never from data):
  k = 1   inverse-CDF token of the AR teacher at window t for u_{t,1} (the AR decoder's token);
  k = 2m  the frozen stage-m student's self-forcing rollout: tokens 1..m from u_1..u_m, then
          tokens m+1..2m from u_{m+1..2m} given the context plus those m tokens, computed for
          all windows at once by one "double forward" (a window stream of width 2m).
"""

import copy
import dataclasses
import datetime
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from kforcing_jax import checkpoints, data, distributed, loop, models, progress, provenance
from kforcing_jax import rundir, sampling, sharding, train_state
from kforcing_jax.models import FunctionalModel
from kforcing_jax.models.pflm import init_from


# ----------------------------------------------------------------------------- targets

def ar_targets(teacher: FunctionalModel, params, tokens, u, tau):
  """k = 1 targets (B, N, 1): inverse-CDF sample of the AR teacher at every window."""
  return ar_rollout(teacher, params, tokens, u, tau)[0]


def ar_rollout(teacher: FunctionalModel, params, tokens, u, tau):
  """k = 1: (targets (B, N, 1), the teacher's distributions (B, N, 1, V) at temperature tau)."""
  logits, _ = teacher.module(params)(tokens)
  probs = sampling.probabilities(logits, tau[:, None])
  return (sampling.inverse_cdf_from_probs(probs, u[..., 0], teacher.cfg.cdf_order)[..., None],
          probs[:, :, None])


def rollout_targets(teacher: FunctionalModel, params, tokens, u, tau):
  """k = 2m targets (B, N, 2m) from the frozen stage-m student (teacher.k_max = m)."""
  return student_rollout(teacher, params, tokens, u, tau)[0]


def student_rollout(teacher: FunctionalModel, params, tokens, u, tau):
  """k = 2m: the frozen stage-m student's self-forcing rollout (teacher.k_max = m):
  (tokens (B, N, 2m), the slot logits (B, N, 2m, V) that produced them).

  First half: the student's own all-windows forward on u_1..u_m. Second half, the double
  forward: window t = [first-half tokens at t+1..t+m | hints for u_{m+1..2m} at t+m+1..t+2m]
  attends to context <= t and causally within the window, so hint i sees all first-half
  tokens of its window and hints <= i - exactly decoding the first half, caching it, and
  decoding the second half. Tokens are the student's readout (model.readout) of its logits.
  """
  m = teacher.k_max
  student = teacher.module(params)
  backbone = student.backbone
  first_logits, ctx_kvs = student(tokens, u[..., :m], tau)
  first = sampling.student_tokens(teacher.cfg, first_logits, u[..., :m])  # (B, N, m)
  n = tokens.shape[1]
  slots = jnp.concatenate([backbone.embed_tokens(first),
                           student.hint_states(u[..., m:], tau[:, None, None])], axis=2)
  positions = jnp.arange(n)[:, None] + jnp.arange(1, 2 * m + 1)[None, :]
  ctx_len = (jnp.arange(n) + 1)[None]
  hidden, kvs = backbone.window_stream(slots, positions[None], ctx_kvs, ctx_len)
  pick = lambda j, logits: sampling.student_tokens(  # noqa: E731
      teacher.cfg, logits, u[..., m + j])
  # under token feedback the second half's later slots also read the first half's tokens
  second_logits, second = student.slot_readout(
      hidden[:, :, m:], positions[None, :, m:], ctx_kvs[-1], ctx_len, pick,
      prefix_kv=tuple(x[:, :, :m] for x in kvs[-1]))
  return (jnp.concatenate([first, second], axis=-1),
          jnp.concatenate([first_logits, second_logits], axis=2))


def stage_distributions(teacher: FunctionalModel, params, tokens, u, tau):
  """(targets (B, N, k), target distributions (B, N, k, V)) of a stage whose student reads
  out by inverse CDF: the teacher's tokens and the distributions it drew them from (the AR
  model's at temperature tau; a stage-m student's softmax of its slot logits, which are
  conditioned on tau through its hints)."""
  if teacher.kind == 'ar':
    return ar_rollout(teacher, params, tokens, u, tau)
  targets, logits = student_rollout(teacher, params, tokens, u, tau)
  return targets, sampling.probabilities(logits)


def soft_ar_targets(teacher: FunctionalModel, params, tokens, u, tau, half_width):
  """Noise-neighbourhood soft targets of stage k=1: q(v) = the share of [u - h, u + h]
  (clipped to [0, 1]) covered by token v's interval, h = half_width (B,). h = 0 is the hard
  target; h >= 1 is the teacher's whole distribution. A wide window early gives every token
  near u a gradient (the student first learns which tokens live in which part of [0, 1)); it
  narrows to the hard target during the stage (`stage_noise`). Id order only."""
  logits, _ = teacher.module(params)(tokens)
  probs = sampling.probabilities(logits, tau[:, None])
  hard = sampling.inverse_cdf_from_probs(probs, u[..., 0], teacher.cfg.cdf_order)
  lo, hi = sampling.id_order_intervals(probs)
  h = half_width[:, None, None]
  a = jnp.clip(u[..., :1] - h, 0.0, 1.0)
  b = jnp.clip(u[..., :1] + h, 0.0, 1.0)
  overlap = jnp.maximum(jnp.minimum(hi, b) - jnp.maximum(lo, a), 0.0)
  soft = overlap / jnp.maximum(overlap.sum(-1, keepdims=True), 1e-30)
  q = jnp.where(h > 0, soft, jax.nn.one_hot(hard, probs.shape[-1], dtype=soft.dtype))
  return hard[..., None], q


def stage_targets(teacher: FunctionalModel, params, tokens, u, tau):
  if teacher.kind == 'ar':
    return ar_targets(teacher, params, tokens, u, tau)
  return rollout_targets(teacher, params, tokens, u, tau)


def greedy_rollout(ar: FunctionalModel, params, tokens, k: int):
  """(B, N, k): the AR teacher's greedy k-token continuation of every window at once."""
  backbone = ar.module(params)
  logits, ctx_kvs = backbone(tokens)
  n = tokens.shape[1]
  greedy = [jnp.argmax(logits, -1).astype(jnp.int32)]
  for j in range(1, k):
    slots = backbone.embed_tokens(jnp.stack(greedy, axis=-1))
    positions = jnp.arange(n)[:, None] + jnp.arange(1, j + 1)[None, :]
    hidden, _ = backbone.window_stream(slots, positions[None], ctx_kvs,
                                       (jnp.arange(n) + 1)[None])
    greedy.append(jnp.argmax(backbone.logits(hidden[:, :, -1]), -1).astype(jnp.int32))
  return jnp.stack(greedy, axis=-1)


def inverted_noise(ar: FunctionalModel, params, tokens, k: int, r, tau):
  """Noise inversion of real continuations: u_{t,i} uniform inside the AR teacher's CDF
  interval of the real token x_{t+i} (the sampler's order, model.cdf_order). r: (B, N, k) in [0,1).
  Returns (u (B, N, k), real targets (B, N, k), valid (B, N, k)): slot i of window t is
  valid when x_{t+i} is inside the sequence and has a non-empty interval."""
  logits, _ = ar.module(params)(tokens)
  probs = sampling.probabilities(logits, tau[:, None])                 # (B, N, V)
  n = tokens.shape[1]
  idx = jnp.arange(n)[:, None] + jnp.arange(k)[None, :]                # predictor position
  valid = idx + 1 < n
  pred = jnp.minimum(idx, n - 1)
  target = jnp.take(tokens, jnp.minimum(idx + 1, n - 1), axis=1)      # (B, N, k)
  lo, hi = sampling.token_cdf_interval(probs[:, pred], target, ar.cfg.cdf_order)
  u = jnp.minimum(lo + (hi - lo) * r, jnp.nextafter(hi, 0.0))
  # a real token whose probability is below float32 resolution has an empty interval: no u
  # reproduces it, so that slot is left out of the data term
  return jnp.clip(u, 0.0, 1.0), target, valid[None] & (hi > lo)


# ----------------------------------------------------------------------------- losses

def window_mask(mask, k: int):
  """(B, N) valid windows: t + k inside the sequence and the context token t real."""
  n = mask.shape[1]
  return (mask > 0) & (jnp.arange(n) + k < n)[None, :]


def slot_metrics(logits, targets, weights, predicted=None):
  """Per-slot CE and accuracy. logits (B, N, k, V), targets (B, N, k), weights (B, N);
  predicted (B, N, k): the student's tokens (default: the argmax of the logits)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  if predicted is None:
    predicted = jnp.argmax(logits, -1)
  correct = (predicted == targets).astype(jnp.float32)
  w = weights.astype(jnp.float32)
  denom = jnp.maximum(w.sum(), 1.0)
  loss_i = jnp.einsum('bnk,bn->k', nll, w) / denom
  acc_i = jnp.einsum('bnk,bn->k', correct, w) / denom
  acc_total = jnp.einsum('bn,bn->', jnp.prod(correct, -1), w) / denom
  return loss_i, acc_i, acc_total, denom


def distribution_loss(student: FunctionalModel, teacher: FunctionalModel, params, batch,
                      teacher_params):
  """The loss of an inverse-CDF-readout student: per slot KL(teacher's distribution || the
  student's), the teacher's distributions taken along its own shared-noise rollout. Its
  tokens (the inverse-CDF samples of its distributions for the slots' noises) score acc_i."""
  k = student.k_max
  tokens, u, tau = batch['tokens'], batch['u'], batch['tau']
  targets, q = jax.lax.stop_gradient(stage_distributions(teacher, teacher_params, tokens, u, tau))
  # token feedback is trained on the teacher's tokens (its later slots learn the teacher's
  # conditionals); the held-out metrics (make_stage_eval) feed the student's own tokens
  logits, _ = student.module(params)(tokens, u, tau, fed=targets)
  windows = window_mask(batch['mask'], k)
  predicted = sampling.student_tokens(student.cfg, logits, u)
  _, acc_i, acc_total, denom = slot_metrics(logits, targets, windows, predicted)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  kl = jnp.sum(jnp.where(q > 0, q * (jnp.log(jnp.where(q > 0, q, 1.0)) - logp), 0.0), axis=-1)
  w = windows.astype(jnp.float32)
  kl_i = jnp.einsum('bnk,bn->k', kl, w) / denom
  metrics = {'windows': jnp.sum(w), 'acc_total': acc_total}
  metrics.update({f'loss_{i + 1}': kl_i[i] for i in range(k)})
  metrics.update({f'acc_{i + 1}': acc_i[i] for i in range(k)})
  return kl_i.mean(), metrics


def slot_weights(dc, k: int):
  """(k,) loss weights of a stage-k student's slots, summing to 1: the first k/2 slots (the ones
  it inherits from its initialisation, the stage-k/2 student) weigh distill.inherited_slot_weight
  against 1 for the new ones (default 1: the plain mean)."""
  w = jnp.where(jnp.arange(k) < k // 2, float(dc.get('inherited_slot_weight', 1.0)), 1.0)
  return w / jnp.sum(w)


def distill_loss(student: FunctionalModel, teacher: FunctionalModel, dc, params, batch,
                 teacher_params, ar_params):
  if student.cfg.readout == 'inverse_cdf':
    return distribution_loss(student, teacher, params, batch, teacher_params)
  k = student.k_max
  tokens, u, tau = batch['tokens'], batch['u'], batch['tau']
  smoothing = teacher.kind == 'ar' and dc.get('target_smoothing', 0.0) > 0
  matching = teacher.kind != 'ar' and dc.get('logit_matching', 0.0) > 0
  if smoothing:
    targets, q = jax.lax.stop_gradient(soft_ar_targets(teacher, teacher_params, tokens, u, tau,
                                                       batch['half_width']))
  elif matching:
    targets, teacher_logits = jax.lax.stop_gradient(
        student_rollout(teacher, teacher_params, tokens, u, tau))
  else:
    targets = jax.lax.stop_gradient(stage_targets(teacher, teacher_params, tokens, u, tau))
  logits, _ = student.module(params)(tokens, u, tau, fed=targets)
  windows = window_mask(batch['mask'], k)
  loss_i, acc_i, acc_total, denom = slot_metrics(logits, targets, windows)
  # the plain mean unless the inherited slots are re-weighted (the same arithmetic as before)
  reweighted = teacher.kind != 'ar' and dc.get('inherited_slot_weight', 1.0) != 1.0
  over_slots = (lambda x: jnp.sum(slot_weights(dc, k) * x)) if reweighted else jnp.mean
  loss = over_slots(loss_i)
  # the loss is a mean over these windows: gradient accumulation weights microbatches by it
  metrics = {'windows': jnp.sum(windows.astype(jnp.float32))}
  if smoothing:
    logp = jax.nn.log_softmax(logits[:, :, 0].astype(jnp.float32), axis=-1)
    soft_nll = -jnp.sum(q * logp, axis=-1)
    loss = jnp.einsum('bn,bn->', soft_nll, windows.astype(jnp.float32)) / denom
    metrics['soft_loss'] = loss
    metrics['half_width'] = batch['half_width'].mean()
  if matching:
    # logit matching: cross-entropy to the frozen teacher's softmax along its rollout (the
    # whole function whose argmax is the hard target, not only the argmax), mixed with the
    # hard-target loss by distill.logit_matching
    alpha = dc.logit_matching
    q = jax.nn.softmax(teacher_logits.astype(jnp.float32), axis=-1)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    match_i = jnp.einsum('bnk,bn->k', -jnp.sum(q * logp, axis=-1),
                         windows.astype(jnp.float32)) / denom
    metrics['match_loss'] = match_i.mean()
    loss = (1.0 - alpha) * loss + alpha * over_slots(match_i)
  metrics.update({f'loss_{i + 1}': loss_i[i] for i in range(k)})
  metrics.update({f'acc_{i + 1}': acc_i[i] for i in range(k)})
  metrics['acc_total'] = acc_total
  if dc.data_weight > 0:
    u_inv, real, valid = inverted_noise(ar_params[0], ar_params[1], tokens, k, batch['r'], tau)
    data_logits, _ = student.module(params)(tokens, jax.lax.stop_gradient(u_inv), tau,
                                            fed=real)
    w = window_mask(batch['mask'], k) & jnp.all(valid, axis=-1)
    data_loss_i, *_ = slot_metrics(data_logits, real, w)
    metrics['data_loss'] = data_loss_i.mean()
    loss = loss + dc.data_weight * data_loss_i.mean()
  return loss, metrics


# ----------------------------------------------------------------------------- stages

# noises of the held-out batches: seed + this offset, never a training step's
VALIDATION_SEED_OFFSET = 10_000

def smoothing_half_width(dc, k: int, step: int, steps: int) -> float:
  """Soft-target half-width at `step` of a stage: distill.target_smoothing at step 0, falling
  linearly to 0 at distill.smoothing_decay * steps (stage k=1 only; 0 = hard targets)."""
  h0 = dc.get('target_smoothing', 0.0)
  if k != 1 or h0 <= 0 or steps <= 0:
    return 0.0
  end = max(dc.get('smoothing_decay', 0.8) * steps, 1.0)
  return float(h0 * max(0.0, 1.0 - step / end))


def stage_noise(seed: int, step: int, batch: int, n: int, k: int, dc, steps: int):
  """Host-side noises for one global batch: u (B, N, k), tau (B,), r (B, N, k), and the
  soft-target half_width (B,) of this step of a `steps`-step stage (`smoothing_half_width`;
  0 for a k outside the schedule, e.g. the evaluation's held-out batches).

  A pure function of (seed, step), so a resumed stage sees exactly the same noises."""
  rng = np.random.default_rng([seed, step, k])
  u = rng.random((batch, n, k), dtype=np.float32)
  lo, hi = dc.tau_range
  tau = (lo + (hi - lo) * rng.random((batch,), dtype=np.float32)).astype(np.float32)
  r = rng.random((batch, n, k), dtype=np.float32)
  half_width = np.full((batch,), smoothing_half_width(dc, k, step, steps), np.float32)
  return {'u': u, 'tau': tau, 'r': r, 'half_width': half_width}


def validate_schedule(stages) -> list[tuple[int, int]]:
  stages = [(int(k), int(s)) for k, s in stages]
  if not stages or stages[0][0] != 1:
    raise ValueError(f'distill.stages={stages}: the first stage must be k=1 (from the AR '
                     'teacher).')
  for (k_prev, _), (k, _) in zip(stages, stages[1:]):
    if k != 2 * k_prev:
      raise ValueError(f'distill.stages: stage k={k} follows k={k_prev}; each stage must '
                       'double the previous k (self-forcing rollout of two halves).')
  return stages


def stage_seq_len(config) -> int:
  n = config.distill.seq_len or config.data.seq_len
  if n > config.data.seq_len:
    raise ValueError(f'distill.seq_len={n} exceeds data.seq_len={config.data.seq_len}.')
  return n


# loss terms of the argmax readout's loss (distill_loss) and their "off" values: an inverse-CDF
# student is distilled by per-slot KL (distribution_loss), which uses none of them
ARGMAX_ONLY_FIELDS = {'data_weight': 0.0, 'target_smoothing': 0.0, 'logit_matching': 0.0,
                      'inherited_slot_weight': 1.0}


def argmax_only_settings(dc) -> dict:
  """{field: value} of config.distill's argmax-readout loss terms that are switched on."""
  return {f: dc.get(f, off) for f, off in ARGMAX_ONLY_FIELDS.items() if dc.get(f, off) != off}


def stage_optimizer_config(dc, k: int):
  """config.distill's optimizer for stage k: distill.later_learning_rate (when > 0) is the peak
  learning rate of the stages k >= 2, whose students start from a trained stage rather than
  from the AR teacher (0 = distill.learning_rate in every stage)."""
  later = dc.get('later_learning_rate', 0.0)
  if k == 1 or not later:
    return dc
  oc = copy.deepcopy(dc)
  oc.learning_rate = later
  return oc


def stage_program(config, layout: sharding.Layout, k: int, prev_k: int | None,
                  steps: int | None = None) -> train_state.Program:
  """The jitted step of stage k (teacher: the AR model when prev_k is None, else the stage
  prev_k student) on `layout`: step(state, batch, teacher_params, ar_params or None)."""
  dc = config.distill
  if dc.get('target_smoothing', 0.0) > 0 and config.model.get('cdf_order', 'id') != 'id':
    raise ValueError('distill.target_smoothing needs model.cdf_order=id (the soft targets use '
                     'every token\'s id-order interval).')
  if config.model.get('readout', 'argmax') == 'inverse_cdf' and argmax_only_settings(dc):
    raise ValueError('model.readout=inverse_cdf is distilled on the teacher\'s distributions '
                     f'(KL per slot); {argmax_only_settings(dc)} belong to the argmax readout: '
                     f'set them to {ARGMAX_ONLY_FIELDS}.')
  if dc.data_weight > 0 and dc.microbatches > 1:
    # microbatches are weighted by the main term's window count; the data term averages over
    # its own (different) count, so accumulation would not equal the full-batch update
    raise ValueError(f'distill.data_weight={dc.data_weight} with distill.microbatches='
                     f'{dc.microbatches} is not supported: set microbatches=1 (with '
                     'model.remat to save memory) or data_weight=0.')
  steps = dict(validate_schedule(dc.stages))[k] if steps is None else steps
  student, ar = models.student(config, k), models.teacher(config)
  teacher = ar if prev_k is None else models.student(config, prev_k)
  optimizer = train_state.make_optimizer(stage_optimizer_config(dc, k), steps)
  abstract = train_state.abstract_train_state(student, optimizer, layout.mesh, layout.rules)
  b, n = dc.batch_size, stage_seq_len(config)
  batch = layout.abstract_batch({'tokens': ((b, n), jnp.int32), 'mask': ((b, n), jnp.float32),
                                 'u': ((b, n, k), jnp.float32), 'tau': ((b,), jnp.float32),
                                 'r': ((b, n, k), jnp.float32),
                                 'half_width': ((b,), jnp.float32)})
  extra = (layout.abstract_params(teacher),
           layout.abstract_params(ar) if dc.data_weight > 0 else None)
  step = train_state.make_train_step(
      lambda p, x, tp, ap: distill_loss(student, teacher, dc, p, x, tp, (ar, ap)),
      optimizer, abstract, {name: x.sharding for name, x in batch.items()}, layout.mesh,
      layout.rules, extra_args_shardings=jax.tree.map(lambda x: x.sharding, extra),
      microbatches=dc.microbatches, weight_key='windows')
  return train_state.Program(student, optimizer, abstract, batch, extra, step)


def stage_batches(config, layout: sharding.Layout, k: int, split: str, shuffle: bool,
                  seed_offset: int, tokenizer=None):
  """step -> the stage's global batch: token rows cut to the stage length plus the noises
  (tau = 1 outside the train split, whatever distill.tau_range trains on)."""
  dc = config.distill
  n = stage_seq_len(config)
  steps = dict(validate_schedule(dc.stages)).get(k, 0)
  tokens_at = data.global_batches(config, layout, split, dc.batch_size, shuffle, tokenizer)
  block, blocks = distributed.local_batch_rows(layout.mesh, layout.rules, dc.batch_size)
  rows = slice(block * dc.batch_size // blocks, (block + 1) * dc.batch_size // blocks)

  def batch_at(step):
    noise = stage_noise(config.seed + seed_offset, step, dc.batch_size, n, k, dc, steps)
    if split != 'train':  # held-out agreement is measured at the decoding temperature
      noise['tau'] = np.ones_like(noise['tau'])
    batch = {key: v[:, :n] for key, v in tokens_at(step).items()}
    return dict(batch, **layout.global_batch({key: v[rows] for key, v in noise.items()}))
  return batch_at


@dataclasses.dataclass(frozen=True)
class Teachers:
  """A stage's frozen models: its teacher (the AR model or the previous stage) and the AR
  model (the baseline of the stage evaluation and the noise-inversion term)."""
  teacher: rundir.Export
  ar: rundir.Export


def load_teachers(config, workdir: str, layout: sharding.Layout, prev_k: int | None,
                  tokenizer=None) -> Teachers:
  """The frozen models of the stage after prev_k (the AR teacher's when None), checked against
  `tokenizer` when given (rundir.load_export: a recorded tokenizer fingerprint must match)."""
  directory = rundir.teacher_dir(workdir) if prev_k is None else rundir.stage_dir(workdir, prev_k)
  if not checkpoints.has_params(rundir.params_dir(directory)):
    raise FileNotFoundError(f'stage k={2 * prev_k if prev_k else 1} needs its teacher at '
                            f'{rundir.params_dir(directory)}; run the teacher / previous stage '
                            'first (python -m kforcing_jax.main.train, or distill without '
                            '--stage).')
  ar = rundir.load_export(rundir.teacher_dir(workdir), layout, kind='ar', config=config,
                          tokenizer=tokenizer)
  if prev_k is None:
    return Teachers(ar, ar)
  teacher = rundir.load_export(rundir.stage_dir(workdir, prev_k), layout, kind='pflm',
                               config=config, tokenizer=tokenizer)
  if teacher.k != prev_k:
    raise ValueError(f'{teacher.directory} holds a k={teacher.k} student, but stage '
                     f'k={2 * prev_k} needs the k={prev_k} stage: re-run that stage.')
  return Teachers(teacher, ar)


def make_stage_eval(student: FunctionalModel, teachers: Teachers, k: int, batches):
  """acc_i / acc_total of the student against the stage teacher on held-out windows, and
  the ignore-the-noise baseline: k=1 -> E[max p] of the teacher; k>1 -> agreement of the
  teacher rollout with the AR teacher's greedy continuation."""
  teacher, ar = teachers.teacher.model, teachers.ar.model

  @jax.jit
  def counts(params, teacher_params, ar_params, batch):
    tokens, u, tau = batch['tokens'], batch['u'], batch['tau']
    targets = stage_targets(teacher, teacher_params, tokens, u, tau)
    logits, _ = student.module(params)(tokens, u, tau)
    w = window_mask(batch['mask'], k).astype(jnp.float32)
    correct = (sampling.student_tokens(student.cfg, logits, u) == targets).astype(jnp.float32)
    if k == 1:
      ar_logits, _ = ar.module(ar_params)(tokens)
      base = jnp.max(sampling.probabilities(ar_logits, tau[:, None]), axis=-1)
    else:
      base = jnp.all(greedy_rollout(ar, ar_params, tokens, k) == targets, -1)
    return (jnp.einsum('bnk,bn->k', correct, w), jnp.einsum('bn,bn->', correct.prod(-1), w),
            jnp.einsum('bn,bn->', base.astype(jnp.float32), w), w.sum())

  def evaluate(state):
    acc, total, base, n = np.zeros(k), 0.0, 0.0, 0.0
    for batch in batches:
      c_i, c_tot, c_base, c_n = jax.device_get(
          counts(train_state.averaged_params(state), teachers.teacher.params,
                 teachers.ar.params, batch))
      acc, total, base, n = acc + c_i, total + c_tot, base + c_base, n + c_n
    n = max(n, 1.0)
    out = {f'acc_{i + 1}': float(acc[i] / n) for i in range(k)}
    out.update(acc_total=float(total / n), baseline_acc_total=float(base / n), windows=float(n))
    return out

  return evaluate


def run_stage(config, workdir: str, layout: sharding.Layout, k: int, steps: int,
              prev_k: int | None, tokenizer=None) -> dict:
  """Train (or resume) stage k and export it; returns its final validation metrics."""
  dc = config.distill
  program = stage_program(config, layout, k, prev_k, steps)  # refuses bad settings up front
  teachers = load_teachers(config, workdir, layout, prev_k, tokenizer)
  student = program.model
  init = train_state.make_init_state(student, program.optimizer, program.abstract_state)
  fresh = jax.jit(student.init)
  rng = jax.random.key(config.seed + 1000 * k)

  def init_state():
    state = init(rng)
    params, created = init_from(teachers.teacher.params, fresh(rng), teachers.teacher.kind)
    progress.log(f'student init from {teachers.teacher.kind}: kept {len(created)} fresh '
                 f'tensors: {", ".join(created) or "none"}')
    state['params'] = jax.device_put(params, train_state.shardings_of(program.abstract_state)
                                     ['params'])
    return state

  # what this stage is built on: in every checkpoint's meta (a resume on another teacher is
  # refused by `run`) and in the export's
  made_from = {provenance.TEACHER_KEY: provenance.params_fingerprint(teachers.teacher.params),
               provenance.TEACHER_DIR_KEY: epath.Path(teachers.teacher.directory).name}
  ar_params = teachers.ar.params if dc.data_weight > 0 else None
  val_at = stage_batches(config, layout, k, 'validation', False, VALIDATION_SEED_OFFSET, tokenizer)
  out_dir = rundir.stage_dir(workdir, k)
  state, metrics = loop.run(loop.Loop(
      name=f'distill k={k}', workdir=out_dir, total_steps=steps,
      init_state=init_state, abstract_state=program.abstract_state,
      train_step=lambda s, b: program.step(s, b, teachers.teacher.params, ar_params),
      batch_at=stage_batches(config, layout, k, 'train', True, 0, tokenizer),
      evaluate=make_stage_eval(student, teachers, k, [val_at(i) for i in range(dc.eval_batches)]),
      log_every=dc.log_every, eval_every=dc.eval_every,
      checkpoint_every=dc.checkpoint_every, keep_checkpoints=dc.keep_checkpoints,
      meta={'kind': 'pflm', 'k': k, **made_from}, config_record=provenance.run_record(config),
      profile_steps=dc.profile_steps))
  # with distill.ema_decay the export is the parameter average (what the stage evaluated)
  params = train_state.averaged_params(state)
  identity = {provenance.PARAMS_KEY: provenance.params_fingerprint(params)}
  if tokenizer is not None:
    identity[provenance.TOKENIZER_KEY] = provenance.tokenizer_fingerprint(tokenizer)
  checkpoints.export_params(rundir.params_dir(out_dir), params,
                            {'kind': 'pflm', 'k': k, 'steps': steps, **made_from, **identity})
  return metrics


def built_on(directory: str) -> dict | None:
  """The meta of what stage `directory` holds: its export's, else its newest readable
  checkpoint's (a stage stopped part-way), else None (nothing built yet)."""
  meta = rundir.export_meta(directory)
  if meta is not None:
    return meta
  ckpt_dir = epath.Path(directory) / 'checkpoints'
  if not ckpt_dir.is_dir():
    return None
  ckpt = checkpoints.Checkpointer(str(ckpt_dir), keep=1, async_save=False)
  try:
    for step in reversed(ckpt.all_steps()):
      try:
        return ckpt.read_meta(step)
      except Exception:  # noqa: BLE001
        # a damaged checkpoint (any orbax/OS/JSON error): every checkpoint of a stage records
        # the same teacher, so an older one answers; the loop reports the damage itself
        continue
    return None
  finally:
    ckpt.close()


def set_aside_if_stale(directory: str, k: int) -> bool:
  """Moves stage `directory` to <directory>.stale-<UTC time> when what it holds (export or
  checkpoints) was made from another teacher than its teacher export now; True when it did.

  Moved, not deleted: nothing of the old stage may be resumed or reported as current (so its
  checkpoints, params and eval.json all leave the stage directory), but it may be the only copy
  of hours of training, so it stays on disk for the user to inspect or delete. A stage of
  unknown provenance (written before fingerprints were recorded) is kept and used as it is,
  with a warning: existing runs keep working."""
  meta = built_on(directory)
  origin = None if meta is None else rundir.stage_provenance(directory, meta)
  if jax.process_count() > 1:  # every process has read the stage before process 0 moves it
    multihost_utils.sync_global_devices(f'provenance of {directory} read')
  if origin is None:
    return False
  if origin.status == 'unknown':
    progress.log(f'[distill k={k}] warning: {origin.describe()}; using it as it is (delete '
                 f'{directory} to rebuild it)')
    return False
  if origin.status != 'stale':
    return False
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%dT%H%M%SZ')
  aside = epath.Path(f'{directory}.stale-{stamp}')
  progress.log(f'[distill k={k}] {origin.describe()}: rebuilding (the old '
               f'{epath.Path(directory).name} is moved to {aside})')

  def move():
    if epath.Path(directory).exists():  # host-local disks: each process moves its own copy
      epath.Path(directory).rename(aside)
  distributed.main_process_first(f'set aside {directory}', move)
  return True


def check_teacher_current(workdir: str, k: int, prev_k: int) -> None:
  """`--stage=k` alone must not distil from a stale stage prev_k: the result would be built on
  a model the full run is about to replace."""
  origin = rundir.stage_provenance(rundir.stage_dir(workdir, prev_k))
  if origin.status == 'stale':
    raise ValueError(f'stage k={k} would be distilled from a stale stage: {origin.describe()}. '
                     f'Run distill without --stage (it rebuilds k={prev_k} first) or '
                     f'--stage={prev_k} first.')


def run(config, workdir: str, only_stage: int | None = None) -> dict:
  """Runs every stage (skipping finished ones) or just `only_stage`. Returns {k: eval}.

  A stage (finished or part-way) whose recorded teacher fingerprint differs from its teacher
  export's (the teacher retrained, the previous stage re-run) is stale: it is set aside and
  rebuilt from scratch (`set_aside_if_stale`), which in turn makes the stages after it stale.
  Stages without a recorded fingerprint (older runs) are used with a warning."""
  stages = validate_schedule(config.distill.stages)
  if only_stage is not None and only_stage not in [k for k, _ in stages]:
    raise ValueError(f'--stage={only_stage} is not in distill.stages={stages}.')
  layout = sharding.layout_from_config(config)
  tokenizer = data.load_tokenizer(config)
  data.check_vocab(config, tokenizer)
  results, prev_k = {}, None
  for k, steps in stages:
    out_path = rundir.eval_path(rundir.stage_dir(workdir, k))
    if only_stage is None or only_stage == k:
      if only_stage is not None and prev_k is not None:
        check_teacher_current(workdir, k, prev_k)
      set_aside_if_stale(rundir.stage_dir(workdir, k), k)
      done = progress.read_json(out_path) if only_stage is None else None
      if done is not None:
        rundir.check_finished_stage(config, rundir.stage_dir(workdir, k))
        results[k] = done
        progress.log(f'[distill k={k}] already done ({out_path}); skipping')
      else:
        t0 = time.time()
        metrics = run_stage(config, workdir, layout, k, steps, prev_k, tokenizer)
        results[k] = {'k': k, 'acc': [metrics[f'acc_{i + 1}'] for i in range(k)],
                      'acc_total': metrics['acc_total'],
                      'baseline_acc_total': metrics['baseline_acc_total'],
                      'steps': steps, 'validation_windows': metrics['windows'],
                      'tau_range': list(config.distill.tau_range),
                      'data_weight': config.distill.data_weight,
                      'seconds': time.time() - t0}
        progress.write_json(out_path, results[k])
        progress.log(f'[distill k={k}] acc_total {results[k]["acc_total"]:.4f} vs '
                     f'ignore-the-noise baseline {results[k]["baseline_acc_total"]:.4f} -> '
                     f'{out_path}')
    prev_k = k
  return results
