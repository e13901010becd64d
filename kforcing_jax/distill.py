"""Progressive self-forcing distillation: AR teacher -> k=1 -> k=2 -> k=4 (METHOD.md s.4).

`python -m kforcing_jax.distill --config=... --workdir=... [--stage=K]` runs every stage of
`config.distill.stages` (or one), each initialised from the previous stage's params (stage 1
from the AR teacher), each resumable, each writing <workdir>/student_k{K}/ with checkpoints/,
params/, metrics.jsonl and eval.json.

Stage targets (never from data):
  k = 1   inverse-CDF token of the AR teacher at window t for u_{t,1} (the AR decoder's token);
  k = 2m  the frozen stage-m student's self-forcing rollout: tokens 1..m from u_1..u_m, then
          tokens m+1..2m from u_{m+1..2m} given the context plus those m tokens, computed for
          all windows at once by one "double forward" (a window stream of width 2m).
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from kforcing_jax import checkpoints, cli, distributed, loop, progress, sampling, sharding, train
from kforcing_jax import train_state
from kforcing_jax.models import FunctionalModel, backbone_config

_STAGE = flags.DEFINE_integer('stage', None, 'Run only the stage with this k.')


# ----------------------------------------------------------------------------- models

def student_model(config, k: int) -> FunctionalModel:
  return FunctionalModel(backbone_config(config.model), 'pflm', k_max=k)


def init_student_from(source_params: dict, student_params: dict, source_kind: str,
                      log=print) -> dict:
  """Copy every backbone/head weight (and, from a student, the noise encoder) into
  freshly initialised student params. A shape mismatch names the tensor and stops."""
  source = {'backbone': source_params} if source_kind == 'ar' else source_params
  src_flat = dict(jax.tree_util.tree_leaves_with_path(source))
  copied, created = [], []

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
    copied.append(name)
    return jnp.copy(src)  # a copy: the student's state is donated, the teacher's is not

  out = jax.tree_util.tree_map_with_path(take, student_params)
  log(f'student init from {source_kind}: copied {len(copied)} tensors, created '
      f'{len(created)} new: {", ".join(created) or "none"}')
  return out


# ----------------------------------------------------------------------------- targets

def ar_targets(teacher: FunctionalModel, params, tokens, u, tau):
  """k = 1 targets (B, N, 1): inverse-CDF sample of the AR teacher at every window."""
  logits, _ = teacher.module(params)(tokens)
  return sampling.inverse_cdf_sample(logits, u[..., 0], tau[:, None])[..., None]


def rollout_targets(teacher: FunctionalModel, params, tokens, u, tau):
  """k = 2m targets (B, N, 2m) from the frozen stage-m student (teacher.k_max = m).

  First half: the student's own all-windows forward on u_1..u_m. Second half, the double
  forward: window t = [first-half tokens at t+1..t+m | hints for u_{m+1..2m} at t+m+1..t+2m]
  attends to context <= t and causally within the window, so hint i sees all first-half
  tokens of its window and hints <= i - exactly decoding the first half, caching it, and
  decoding the second half.
  """
  m = teacher.k_max
  student = teacher.module(params)
  backbone = student.backbone
  first_logits, ctx_kvs = student(tokens, u[..., :m], tau)
  first = jnp.argmax(first_logits, axis=-1).astype(jnp.int32)         # (B, N, m)
  n = tokens.shape[1]
  slots = jnp.concatenate([backbone.embed_tokens(first),
                           student.hint_states(u[..., m:], tau[:, None, None])], axis=2)
  positions = jnp.arange(n)[:, None] + jnp.arange(1, 2 * m + 1)[None, :]
  hidden, _ = backbone.window_stream(slots, positions[None], ctx_kvs, (jnp.arange(n) + 1)[None])
  second = jnp.argmax(backbone.logits(hidden[:, :, m:]), axis=-1).astype(jnp.int32)
  return jnp.concatenate([first, second], axis=-1)


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
  interval of the real token x_{t+i} (same id order as the sampler). r: (B, N, k) in [0,1).
  Returns (u (B, N, k), real targets (B, N, k), valid (B, N, k)): slot i of window t is
  valid when x_{t+i} is inside the sequence and has a non-empty interval."""
  logits, _ = ar.module(params)(tokens)
  probs = sampling.probabilities(logits, tau[:, None])                 # (B, N, V)
  n = tokens.shape[1]
  idx = jnp.arange(n)[:, None] + jnp.arange(k)[None, :]                # predictor position
  valid = idx + 1 < n
  pred = jnp.minimum(idx, n - 1)
  target = jnp.take(tokens, jnp.minimum(idx + 1, n - 1), axis=1)      # (B, N, k)
  lo, hi = sampling.token_cdf_interval(probs[:, pred], target)
  u = jnp.minimum(lo + (hi - lo) * r, jnp.nextafter(hi, 0.0))
  # a real token whose probability is below float32 resolution has an empty interval: no u
  # reproduces it, so that slot is left out of the data term
  return jnp.clip(u, 0.0, 1.0), target, valid[None] & (hi > lo)


# ----------------------------------------------------------------------------- losses

def window_mask(mask, k: int):
  """(B, N) valid windows: t + k inside the sequence and the context token t real."""
  n = mask.shape[1]
  return (mask > 0) & (jnp.arange(n) + k < n)[None, :]


def slot_metrics(logits, targets, weights):
  """Per-slot CE and accuracy. logits (B, N, k, V), targets (B, N, k), weights (B, N)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  w = weights.astype(jnp.float32)
  denom = jnp.maximum(w.sum(), 1.0)
  loss_i = jnp.einsum('bnk,bn->k', nll, w) / denom
  acc_i = jnp.einsum('bnk,bn->k', correct, w) / denom
  acc_total = jnp.einsum('bn,bn->', jnp.prod(correct, -1), w) / denom
  return loss_i, acc_i, acc_total, denom


def distill_loss(student: FunctionalModel, teacher: FunctionalModel, dc, params, batch,
                 teacher_params, ar_params):
  k = student.k_max
  tokens, u, tau = batch['tokens'], batch['u'], batch['tau']
  targets = jax.lax.stop_gradient(stage_targets(teacher, teacher_params, tokens, u, tau))
  logits, _ = student.module(params)(tokens, u, tau)
  windows = window_mask(batch['mask'], k)
  loss_i, acc_i, acc_total, _ = slot_metrics(logits, targets, windows)
  loss = loss_i.mean()
  # the loss is a mean over these windows: gradient accumulation weights microbatches by it
  metrics = {'windows': jnp.sum(windows.astype(jnp.float32))}
  metrics.update({f'loss_{i + 1}': loss_i[i] for i in range(k)})
  metrics.update({f'acc_{i + 1}': acc_i[i] for i in range(k)})
  metrics['acc_total'] = acc_total
  if dc.data_weight > 0:
    u_inv, real, valid = inverted_noise(ar_params[0], ar_params[1], tokens, k, batch['r'], tau)
    data_logits, _ = student.module(params)(tokens, jax.lax.stop_gradient(u_inv), tau)
    w = window_mask(batch['mask'], k) & jnp.all(valid, axis=-1)
    data_loss_i, *_ = slot_metrics(data_logits, real, w)
    metrics['data_loss'] = data_loss_i.mean()
    loss = loss + dc.data_weight * data_loss_i.mean()
  return loss, metrics


# ----------------------------------------------------------------------------- stages

def stage_noise(seed: int, step: int, batch: int, n: int, k: int, dc):
  """Host-side noises for one global batch: u (B, N, k), tau (B,), r (B, N, k).

  A pure function of (seed, step), so a resumed stage sees exactly the same noises."""
  rng = np.random.default_rng([seed, step, k])
  u = rng.random((batch, n, k), dtype=np.float32)
  lo, hi = dc.tau_range
  tau = (lo + (hi - lo) * rng.random((batch,), dtype=np.float32)).astype(np.float32)
  r = rng.random((batch, n, k), dtype=np.float32)
  return {'u': u, 'tau': tau, 'r': r}


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


def stage_dir(workdir: str, k: int) -> str:
  return os.path.join(workdir, f'student_k{k}')


class Stage:
  """Everything one stage needs: models, frozen teacher params, jitted step and evaluation."""

  def __init__(self, exp: train.Experiment, workdir: str, k: int, steps: int, prev_k: int | None):
    config = exp.config
    self.exp, self.k, self.steps = exp, k, steps
    self.dc = config.distill
    if self.dc.data_weight > 0 and self.dc.microbatches > 1:
      # microbatches are weighted by the main term's window count; the data term averages over
      # its own (different) count, so accumulation would not equal the full-batch update
      raise ValueError(f'distill.data_weight={self.dc.data_weight} with distill.microbatches='
                       f'{self.dc.microbatches} is not supported: set microbatches=1 (with '
                       'model.remat to save memory) or data_weight=0.')
    self.dir = stage_dir(workdir, k)
    self.student = student_model(config, k)
    self.ar = train.teacher_model(config)
    self.teacher = self.ar if prev_k is None else student_model(config, prev_k)
    teacher_dir = (os.path.join(workdir, 'teacher', 'params') if prev_k is None
                   else os.path.join(stage_dir(workdir, prev_k), 'params'))
    if not checkpoints.has_params(teacher_dir):
      raise FileNotFoundError(f'stage k={k} needs its teacher at {teacher_dir}; run the '
                              'teacher / previous stage first (python -m kforcing_jax.train, '
                              'or distill without --stage).')
    mesh, rules = exp.mesh, exp.rules
    self.teacher_params, _ = checkpoints.import_params(
        teacher_dir, checkpoints.abstract_like(
            self.teacher.param_shapes, train_state.param_shardings(self.teacher, mesh, rules)))
    # the AR teacher: the baseline of every stage's evaluation and the noise-inversion term;
    # stage 1's teacher already is it
    if prev_k is None:
      self.ar_params = self.teacher_params
    else:
      self.ar_params, _ = checkpoints.import_params(
          os.path.join(workdir, 'teacher', 'params'), checkpoints.abstract_like(
              self.ar.param_shapes, train_state.param_shardings(self.ar, mesh, rules)))
    self.uses_data_term = self.dc.data_weight > 0

  def _batch_fn(self, split, batch_size, shuffle, seed_offset):
    tokens_at = self.exp.batch_fn(split, batch_size, shuffle)
    n = self.dc.seq_len or self.exp.config.data.seq_len
    if n > self.exp.config.data.seq_len:
      raise ValueError(f'distill.seq_len={n} exceeds data.seq_len='
                       f'{self.exp.config.data.seq_len}.')
    block, blocks = distributed.local_batch_rows(self.exp.mesh, self.exp.rules, batch_size)
    rows = slice(block * batch_size // blocks, (block + 1) * batch_size // blocks)

    def batch_at(step):
      noise = stage_noise(self.exp.config.seed + seed_offset, step, batch_size, n, self.k,
                          self.dc)
      local = {key: v[rows] for key, v in noise.items()}
      batch = {key: v[:, :n] for key, v in tokens_at(step).items()}
      return dict(batch, **sharding.global_batch(local, self.exp.mesh, self.exp.rules))
    return batch_at

  def run(self) -> dict:
    exp, dc = self.exp, self.dc
    mesh, rules = exp.mesh, exp.rules
    optimizer = train_state.make_optimizer(dc, self.steps)
    abstract = train_state.abstract_train_state(self.student, optimizer, mesh, rules)
    fresh = jax.jit(self.student.init)
    source_kind = self.teacher.kind
    teacher_params = self.teacher_params

    def init_params(rng):
      log = print if progress.is_main_process() else (lambda msg: None)
      return init_student_from(teacher_params, fresh(rng), source_kind, log=log)

    init = train_state.make_init_state(self.student, optimizer, abstract)
    batch_sh = {key: sharding.batch_sharding(mesh, nd, rules)
                for key, nd in (('tokens', 2), ('mask', 2), ('u', 3), ('tau', 1), ('r', 3))}
    t_sh = train_state.param_shardings(self.teacher, mesh, rules)
    ar_sh = train_state.param_shardings(self.ar, mesh, rules) if self.uses_data_term else None
    step_ar_params = self.ar_params if self.uses_data_term else None
    student, teacher, ar = self.student, self.teacher, self.ar
    step_fn = train_state.make_train_step(
        lambda p, b, tp, ap: distill_loss(student, teacher, dc, p, b, tp, (ar, ap)),
        optimizer, abstract, batch_sh, mesh, rules, extra_args_shardings=(t_sh, ar_sh),
        microbatches=dc.microbatches, weight_key='windows')
    rng = jax.random.key(exp.config.seed + 1000 * self.k)

    def init_state():
      state = init(rng)
      state['params'] = jax.device_put(init_params(rng),
                                       train_state.shardings_of(abstract)['params'])
      return state

    val_batches = [self._batch_fn('validation', dc.batch_size, False, 10_000)(i)
                   for i in range(dc.eval_batches)]
    evaluate = make_stage_eval(self, val_batches)
    state, metrics = loop.run(loop.Loop(
        name=f'distill k={self.k}', workdir=self.dir, total_steps=self.steps,
        init_state=init_state, abstract_state=abstract,
        train_step=lambda s, b: step_fn(s, b, self.teacher_params, step_ar_params),
        batch_at=self._batch_fn('train', dc.batch_size, True, 0), evaluate=evaluate,
        log_every=dc.log_every, eval_every=dc.eval_every,
        checkpoint_every=dc.checkpoint_every, keep_checkpoints=dc.keep_checkpoints,
        meta={'kind': 'pflm', 'k': self.k}))
    checkpoints.export_params(os.path.join(self.dir, 'params'), state['params'],
                              {'kind': 'pflm', 'k': self.k, 'steps': self.steps})
    return metrics


def make_stage_eval(stage: Stage, batches):
  """acc_i / acc_total of the student against the stage teacher on held-out windows, and
  the ignore-the-noise baseline: k=1 -> E[max p] of the teacher; k>1 -> agreement of the
  teacher rollout with the AR teacher's greedy continuation."""
  student, teacher, ar, k = stage.student, stage.teacher, stage.ar, stage.k
  ar_params = stage.ar_params

  @jax.jit
  def counts(params, teacher_params, ar_params, batch):
    tokens, u, tau = batch['tokens'], batch['u'], batch['tau']
    targets = stage_targets(teacher, teacher_params, tokens, u, tau)
    logits, _ = student.module(params)(tokens, u, tau)
    w = window_mask(batch['mask'], k).astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
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
          counts(state['params'], stage.teacher_params, ar_params, batch))
      acc, total, base, n = acc + c_i, total + c_tot, base + c_base, n + c_n
    n = max(n, 1.0)
    out = {f'acc_{i + 1}': float(acc[i] / n) for i in range(k)}
    out.update(acc_total=float(total / n), baseline_acc_total=float(base / n), windows=float(n))
    return out

  return evaluate


def run(config, workdir: str, only_stage: int | None = None) -> dict:
  """Runs every stage (skipping finished ones) or just `only_stage`. Returns {k: eval}."""
  stages = validate_schedule(config.distill.stages)
  if only_stage is not None and only_stage not in [k for k, _ in stages]:
    raise ValueError(f'--stage={only_stage} is not in distill.stages={stages}.')
  exp = train.Experiment(config)
  results, prev_k = {}, None
  for k, steps in stages:
    out_path = os.path.join(stage_dir(workdir, k), 'eval.json')
    if (only_stage is None or only_stage == k):
      if os.path.exists(out_path) and only_stage is None:
        with open(out_path) as f:
          results[k] = json.load(f)
        if progress.is_main_process():
          print(f'[distill k={k}] already done ({out_path}); skipping', flush=True)
      else:
        t0 = time.time()
        metrics = Stage(exp, workdir, k, steps, prev_k).run()
        results[k] = {'k': k, 'acc': [metrics[f'acc_{i + 1}'] for i in range(k)],
                      'acc_total': metrics['acc_total'],
                      'baseline_acc_total': metrics['baseline_acc_total'],
                      'steps': steps, 'validation_windows': metrics['windows'],
                      'tau_range': list(config.distill.tau_range),
                      'data_weight': config.distill.data_weight,
                      'seconds': time.time() - t0}
        if progress.is_main_process():
          with open(out_path, 'w') as f:
            json.dump(results[k], f, indent=2)
          print(f'[distill k={k}] acc_total {results[k]["acc_total"]:.4f} vs ignore-the-noise '
                f'baseline {results[k]["baseline_acc_total"]:.4f} -> {out_path}', flush=True)
    prev_k = k
  return results


def main(argv):
  del argv
  cli.quiet_libraries()
  distributed.initialize()
  run(cli.CONFIG.value, cli.WORKDIR.value, _STAGE.value)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  cli.run(main)
