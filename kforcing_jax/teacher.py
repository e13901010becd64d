"""The AR teacher: its loss, its training program and its run.

`run(config, workdir)` trains (or resumes, or skips when done) the teacher and writes the
teacher directory of the run (rundir.teacher_dir): checkpoints/, params/ (params-only export,
its meta recording the params' and the tokenizer's fingerprints: provenance.py), metrics.jsonl,
TensorBoard events, config.json and eval.json.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax import checkpoints, data, loop, metrics, models, progress, provenance
from kforcing_jax import rundir, sharding, train_state
from kforcing_jax.models import FunctionalModel


def lm_loss(model: FunctionalModel, params, batch):
  logits, _ = model.module(params)(batch['tokens'])
  nll, count = metrics.next_token_nll(logits, batch['tokens'], batch['mask'])
  loss = nll / jnp.maximum(count, 1.0)
  return loss, {'tokens': count}


def make_eval_fn(model: FunctionalModel, layout: sharding.Layout, batches):
  """state -> validation loss / perplexity over fixed held-out batches."""
  @jax.jit
  def nll_sum(params, batch):
    with sharding.use_mesh_rules(layout.mesh, layout.rules):
      logits, _ = model.module(params)(batch['tokens'])
    return metrics.next_token_nll(logits, batch['tokens'], batch['mask'])

  def evaluate(state):
    total, count = 0.0, 0.0
    for batch in batches:
      n, c = jax.device_get(nll_sum(state['params'], batch))
      total, count = total + float(n), count + float(c)
    loss = total / max(count, 1.0)
    return {'val_loss': loss, 'val_ppl': float(np.exp(loss))}

  return evaluate


def train_program(config, layout: sharding.Layout) -> train_state.Program:
  """The teacher's jitted train step (config.train) on `layout`."""
  tc = config.train
  model = models.teacher(config)
  optimizer = train_state.make_optimizer(tc, tc.steps)
  abstract = train_state.abstract_train_state(model, optimizer, layout.mesh, layout.rules)
  shape = (tc.batch_size, config.data.seq_len)
  batch = layout.abstract_batch({'tokens': (shape, jnp.int32), 'mask': (shape, jnp.float32)})
  step = train_state.make_train_step(
      lambda p, b: lm_loss(model, p, b), optimizer, abstract,
      {name: x.sharding for name, x in batch.items()}, layout.mesh, layout.rules,
      microbatches=tc.microbatches, weight_key='tokens')
  return train_state.Program(model, optimizer, abstract, batch, (), step)


def run(config, workdir: str) -> dict:
  """Train (or resume) the teacher; returns the eval.json contents. Skipped when eval.json
  exists."""
  out_dir = rundir.teacher_dir(workdir)
  done = rundir.trained(out_dir, rundir.TEACHER)
  if done is not None:
    return done
  t0 = time.time()
  tokenizer = data.prepared_tokenizer(config)
  layout = sharding.layout_from_config(config)
  tc = config.train
  program = train_program(config, layout)
  model = program.model
  n_params = sharding.log_parameter_shardings(model.logical_axes, model.param_shapes,
                                              layout.mesh, layout.rules)
  init = train_state.make_init_state(model, program.optimizer, program.abstract_state)
  val_batch = data.global_batches(config, layout, 'validation', tc.batch_size, False, tokenizer)
  rng = jax.random.key(config.seed)
  state, eval_metrics = loop.run(loop.Loop(
      name='AR teacher', workdir=out_dir, total_steps=tc.steps,
      init_state=lambda: init(rng), abstract_state=program.abstract_state,
      train_step=program.step,
      batch_at=data.global_batches(config, layout, 'train', tc.batch_size, True, tokenizer),
      evaluate=make_eval_fn(model, layout, [val_batch(i) for i in range(tc.eval_batches)]),
      log_every=tc.log_every, eval_every=tc.eval_every,
      checkpoint_every=tc.checkpoint_every, keep_checkpoints=tc.keep_checkpoints,
      meta={'kind': 'ar'}, config_record=provenance.run_record(config),
      profile_steps=tc.profile_steps))
  # the identities a stage distilled from this teacher records, and loaders check
  checkpoints.export_params(rundir.params_dir(out_dir), state['params'],
                            {'kind': 'ar', 'k': 1, 'steps': tc.steps,
                             provenance.PARAMS_KEY: provenance.params_fingerprint(state['params']),
                             provenance.TOKENIZER_KEY: provenance.tokenizer_fingerprint(tokenizer)})
  result = dict(eval_metrics, unigram_val_ppl=data.unigram_perplexity(config), params=n_params,
                train_steps=tc.steps, seconds=time.time() - t0)
  progress.write_json(rundir.eval_path(out_dir), result)
  progress.log(f'[teacher] val_ppl {result["val_ppl"]:.2f} vs unigram '
               f'{result["unigram_val_ppl"]:.2f} -> {rundir.eval_path(out_dir)}')
  return result
