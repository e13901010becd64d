"""Train the AR teacher: `python -m kforcing_jax.train --config=configs/<name>.py --workdir=DIR`.

Writes <workdir>/teacher/: checkpoints/ (full state, resumable), params/ (params-only export),
metrics.jsonl and eval.json.
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from kforcing_jax import checkpoints, cli, data, distributed, loop, progress, sharding
from kforcing_jax import train_state
from kforcing_jax.models import FunctionalModel, backbone_config



def teacher_model(config) -> FunctionalModel:
  return FunctionalModel(backbone_config(config.model), 'ar')


def next_token_nll(logits, tokens, mask):
  """Summed next-token NLL and target count: position t predicts t+1 where mask[t+1] = 1."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  weights = mask[:, 1:].astype(jnp.float32)
  return jnp.sum(nll * weights), jnp.sum(weights)


def lm_loss(model: FunctionalModel, params, batch):
  logits, _ = model.module(params)(batch['tokens'])
  nll, count = next_token_nll(logits, batch['tokens'], batch['mask'])
  loss = nll / jnp.maximum(count, 1.0)
  return loss, {'tokens': count}


def make_eval_fn(model: FunctionalModel, mesh, rules, batches):
  """Validation loss / perplexity over fixed held-out batches."""
  @jax.jit
  def nll_sum(params, batch):
    with sharding.use_mesh_rules(mesh, rules):
      logits, _ = model.module(params)(batch['tokens'])
    return next_token_nll(logits, batch['tokens'], batch['mask'])

  def evaluate(state):
    total, count = 0.0, 0.0
    for batch in batches:
      n, c = jax.device_get(nll_sum(state['params'], batch))
      total, count = total + float(n), count + float(c)
    loss = total / max(count, 1.0)
    return {'val_loss': loss, 'val_ppl': float(np.exp(loss))}

  return evaluate


class Experiment:
  """What both teacher training and distillation need from a config: mesh, data, batches."""

  def __init__(self, config):
    self.config = config
    self.rules = tuple(tuple(r) for r in config.sharding_rules)
    self.mesh = sharding.mesh_from_config(config)
    self.tokenizer = data.load_tokenizer(config)
    data.check_vocab(config, self.tokenizer)

  def batch_fn(self, split: str, batch_size: int, shuffle: bool):
    block, blocks = distributed.local_batch_rows(self.mesh, self.rules, batch_size)
    source = data.make_batch_source(self.config, split, batch_size, shuffle=shuffle,
                                    process_index=block, process_count=blocks)
    return lambda step: sharding.global_batch(source.batch(step), self.mesh, self.rules)

  def eval_batches(self, batch_size: int, num: int):
    batch_at = self.batch_fn('validation', batch_size, shuffle=False)
    return [batch_at(i) for i in range(num)]

  def batch_shardings(self):
    return {k: sharding.batch_sharding(self.mesh, 2, self.rules) for k in ('tokens', 'mask')}


def run(config, workdir: str) -> dict:
  """Train (or resume) the teacher; returns the eval.json contents."""
  t0 = time.time()
  distributed.main_process_first('prepare data', lambda: data.prepare(config))
  exp = Experiment(config)
  model = teacher_model(config)
  tc = config.train
  out_dir = os.path.join(workdir, 'teacher')
  optimizer = train_state.make_optimizer(tc, tc.steps)
  abstract = train_state.abstract_train_state(model, optimizer, exp.mesh, exp.rules)
  n_params = sharding.log_parameter_shardings(model.logical_axes, model.param_shapes,
                                              exp.mesh, exp.rules)
  init = train_state.make_init_state(model, optimizer, abstract)
  step_fn = train_state.make_train_step(
      lambda p, b: lm_loss(model, p, b), optimizer, abstract, exp.batch_shardings(),
      exp.mesh, exp.rules, microbatches=tc.microbatches, weight_key='tokens')
  rng = jax.random.key(config.seed)
  result_state, eval_metrics = loop.run(loop.Loop(
      name='teacher', workdir=out_dir, total_steps=tc.steps,
      init_state=lambda: init(rng), abstract_state=abstract, train_step=step_fn,
      batch_at=exp.batch_fn('train', tc.batch_size, shuffle=True),
      evaluate=make_eval_fn(model, exp.mesh, exp.rules,
                            exp.eval_batches(tc.batch_size, tc.eval_batches)),
      log_every=tc.log_every, eval_every=tc.eval_every,
      checkpoint_every=tc.checkpoint_every, keep_checkpoints=tc.keep_checkpoints,
      meta={'kind': 'ar'}))
  checkpoints.export_params(os.path.join(out_dir, 'params'), result_state['params'],
                            {'kind': 'ar', 'steps': tc.steps})
  result = dict(eval_metrics, unigram_val_ppl=data.unigram_perplexity(config), params=n_params,
                train_steps=tc.steps, seconds=time.time() - t0)
  if progress.is_main_process():
    with open(os.path.join(out_dir, 'eval.json'), 'w') as f:
      json.dump(result, f, indent=2)
    print(f'[teacher] val_ppl {result["val_ppl"]:.2f} vs unigram {result["unigram_val_ppl"]:.2f}'
          f' -> {out_dir}/eval.json', flush=True)
  return result


def main(argv):
  del argv
  cli.quiet_libraries()
  distributed.initialize()
  run(cli.CONFIG.value, cli.WORKDIR.value)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  cli.run(main)
