"""The training state {step, params, opt_state}, its optimizer, shardings and jitted update.

Shared by teacher training and every distillation stage: only the loss differs.
"""

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from kforcing_jax import sharding
from kforcing_jax.models import FunctionalModel


class ParamAverageState(NamedTuple):
  """count: updates so far; average: the bias-corrected exponential moving average of the
  parameters after each of them (equal to the parameters after the first)."""
  count: jax.Array
  average: Any


def param_average(decay: float) -> optax.GradientTransformation:
  """The last link of an optimizer chain: leaves the updates alone and keeps, in its state, the
  EMA of the parameters they produce, debiased like Adam's moments - after t updates
  sum_s (1 - d) d^(t-s) p_s / (1 - d^t) - so the average does not depend on the parameters the
  optimizer was initialised with (a stage replaces them after init). Kept in the optimizer
  state, it is sharded, checkpointed and restored with it (optax.tree_map_params sees it as a
  copy of the parameters)."""
  if not 0.0 < decay < 1.0:
    raise ValueError(f'parameter-average decay must be in (0, 1); got {decay}.')

  def init(params):
    # the parameters themselves (not a transform of them): tree_map_params finds them that way
    return ParamAverageState(count=jnp.zeros((), jnp.int32), average=params)

  def update(updates, state, params=None):
    if params is None:
      raise ValueError('param_average needs the parameters (optimizer.update(g, s, params)).')
    count = state.count + 1
    # weight of the newest parameters: (1 - d) / (1 - d^t), which is 1 at t = 1
    weight = (1.0 - decay) / (1.0 - decay ** count.astype(jnp.float32))
    average = jax.tree.map(
        lambda a, p, u: (a + weight * (p + u - a).astype(jnp.float32)).astype(a.dtype),
        state.average, params, updates)
    return updates, ParamAverageState(count=count, average=average)

  return optax.GradientTransformation(init, update)


def averaged_params(state: dict):
  """The parameters to evaluate and export: the optimizer's parameter average when it keeps
  one and has seen an update (param_average), else state['params'] (also for a bare
  {'params': ...}, as callers that evaluate exported parameters pass)."""
  is_average = lambda x: isinstance(x, ParamAverageState)  # noqa: E731
  found = [x for x in jax.tree.leaves(state.get('opt_state', ()), is_leaf=is_average)
           if is_average(x)]
  if not found:
    return state['params']
  average = found[0]
  return jax.tree.map(lambda a, p: jnp.where(average.count > 0, a, p), average.average,
                      state['params'])


def make_optimizer(tc, total_steps: int) -> optax.GradientTransformation:
  """AdamW, linear warm-up then cosine decay, global-norm clipping; no decay on vectors; with
  tc.ema_decay > 0 (distillation only), also the parameters' moving average (param_average)."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=tc.learning_rate,
      warmup_steps=min(tc.warmup_steps, max(total_steps - 1, 1)),
      decay_steps=max(total_steps, 2), end_value=tc.learning_rate * tc.end_learning_rate_ratio)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
  links = [optax.clip_by_global_norm(tc.grad_clip),
           optax.adamw(schedule, b1=tc.b1, b2=tc.b2, eps=tc.get('eps', 1e-8),
                       weight_decay=tc.weight_decay, mask=decay_mask)]
  if tc.get('ema_decay', 0.0) > 0:
    links.append(param_average(tc.ema_decay))
  return optax.chain(*links)


def param_shardings(model: FunctionalModel, mesh: Mesh, rules):
  return sharding.tree_shardings(model.logical_axes, model.param_shapes, mesh, rules)


def abstract_train_state(model: FunctionalModel, optimizer, mesh: Mesh, rules):
  """ShapeDtypeStructs (with shardings) of {step, params, opt_state}.

  Optimizer moments are sharded like their parameters; scalars are replicated.
  """
  p_shard = param_shardings(model, mesh, rules)
  abstract_opt = jax.eval_shape(optimizer.init, model.param_shapes)
  opt_shard = optax.tree_map_params(
      optimizer, lambda _, s: s, abstract_opt, p_shard,
      transform_non_params=lambda _: sharding.replicated(mesh))
  shardings = {'step': sharding.replicated(mesh), 'params': p_shard, 'opt_state': opt_shard}
  shapes = {'step': jax.ShapeDtypeStruct((), jnp.int32), 'params': model.param_shapes,
            'opt_state': abstract_opt}
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      shapes, shardings)


def shardings_of(abstract_tree):
  return jax.tree.map(lambda x: x.sharding, abstract_tree)


def make_init_state(model: FunctionalModel, optimizer, abstract_state,
                    params_fn: Callable[[jax.Array], Any] | None = None):
  """Jitted rng -> state, created directly in its target shardings (never on one host)."""
  params_fn = params_fn or model.init

  def init(rng):
    params = params_fn(rng)
    return {'step': jnp.zeros((), jnp.int32), 'params': params,
            'opt_state': optimizer.init(params)}

  return jax.jit(init, out_shardings=shardings_of(abstract_state))


def make_train_step(loss_fn: Callable, optimizer, abstract_state, batch_shardings, mesh,
                    rules, extra_args_shardings=(), microbatches: int = 1,
                    weight_key: str | None = None):
  """Jitted (state, batch, *extra) -> (state, metrics); the state is donated.

  loss_fn(params, batch, *extra) -> (loss, metrics dict). `extra` are read-only inputs such
  as a frozen teacher's parameters: they are never donated and get no optimizer state.

  microbatches > 1 accumulates gradients over that many slices of the batch in a lax.scan, so
  only one slice's activations are ever alive. The loss must be a mean over targets whose count
  is metrics[weight_key]: slices are then weighted by their counts, which gives the full-batch
  loss, gradients and update (up to float summation order) even when padding makes the counts
  differ; the other metrics are count-weighted means, metrics[weight_key] the total.
  """
  if microbatches > 1 and weight_key is None:
    raise ValueError('gradient accumulation needs the loss\'s target-count metric (weight_key).')

  def step(state, batch, *extra):
    with sharding.use_mesh_rules(mesh, rules):
      if microbatches == 1:
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state['params'], batch, *extra)
      else:
        loss, metrics, grads = accumulated_value_and_grad(loss_fn, state['params'], batch, extra,
                                                     microbatches, weight_key)
    updates, opt_state = optimizer.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))
    return {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}, metrics

  state_sh = shardings_of(abstract_state)
  return jax.jit(step, donate_argnums=(0,),
                 in_shardings=(state_sh, batch_shardings) + tuple(extra_args_shardings),
                 out_shardings=(state_sh, sharding.replicated(mesh)))


def split_microbatches(batch: dict, microbatches: int) -> dict:
  """(B, ...) arrays -> (microbatches, B / microbatches, ...), slice m = rows m, m + M, ...

  Strided rather than contiguous slices: with the batch dim sharded in contiguous blocks, every
  device then owns B / (M * devices) rows of every slice, so no slice needs communication.
  """
  def split(x):
    if x.shape[0] % microbatches:
      raise ValueError(f'batch of {x.shape[0]} rows does not split into {microbatches} '
                       'microbatches; make the batch size a multiple of microbatches.')
    x = jnp.swapaxes(x.reshape((x.shape[0] // microbatches, microbatches) + x.shape[1:]), 0, 1)
    return sharding.constrain(x, (None, 'batch') + (None,) * (x.ndim - 2))
  return jax.tree.map(split, batch)


def accumulated_value_and_grad(loss_fn, params, batch, extra, microbatches: int, weight_key: str):
  """Count-weighted loss, metrics and gradients over microbatches, summed in float32."""
  def one_slice(grad_sum, piece):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, piece, *extra)
    weight = metrics[weight_key].astype(jnp.float32)
    grad_sum = jax.tree.map(lambda acc, g: acc + weight * g.astype(jnp.float32), grad_sum, grads)
    return grad_sum, (loss, metrics)

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  grad_sum, (losses, metrics) = jax.lax.scan(one_slice, zeros,
                                             split_microbatches(batch, microbatches))
  weights = metrics[weight_key].astype(jnp.float32)
  total = jnp.maximum(weights.sum(), 1.0)
  grads = jax.tree.map(lambda g, p: (g / total).astype(p.dtype), grad_sum, params)
  mean = lambda x: jnp.sum(weights * x) / total  # noqa: E731
  metrics = {name: (v.sum() if name == weight_key else mean(v)) for name, v in metrics.items()}
  return mean(losses), metrics, grads


@dataclasses.dataclass(frozen=True)
class Program:
  """One training phase's step, built once and shared by its run, launch/compile_tpu and the
  tests: `step(state, batch, *extra)` is jitted with the shardings of `abstract_state`,
  `abstract_batch` and `abstract_extra` (read-only inputs such as a frozen teacher's params)."""
  model: FunctionalModel
  optimizer: optax.GradientTransformation
  abstract_state: Any
  abstract_batch: dict
  abstract_extra: tuple
  step: Callable

  def lower(self):
    """The step lowered for its abstract inputs (compile it for memory and cost analysis)."""
    return self.step.lower(self.abstract_state, self.abstract_batch, *self.abstract_extra)
