"""Compile one teacher train step and one k-token distillation step for a config's shapes and
print XLA's memory analysis (per device) - no data, no parameters, nothing is run.

  python -m kforcing_jax.benchmarks.step_memory --config=configs/owt_ar.py --batch=1 \
      --output=runs/bench/step_memory_owt.json

On this CPU it proves the shapes compile and shows how the memory of the all-windows step grows
with N and k (the blockwise window attention holds (N, 2k, N) + (N, 2k, 2k) scores per head,
never a dense (N + N k)^2 one); on a TPU topology see the scale-out work (launch/).
"""

import json
import os

import jax
import jax.numpy as jnp
from absl import flags

from kforcing_jax import cli, distill, distributed, sharding, train, train_state

_BATCH = flags.DEFINE_integer('batch', 1, 'Sequences per step (global; one device here).')
_K = flags.DEFINE_integer('k', 4, 'The distillation stage to compile (teacher = stage k/2).')
_OUTPUT = flags.DEFINE_string('output', None, 'Optional JSON output path.')


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  out = {name: int(getattr(m, f'{name}_size_in_bytes')) for name in
         ('argument', 'output', 'temp', 'alias', 'generated_code')}
  out['peak_estimate'] = out['argument'] + out['output'] + out['temp'] - out['alias']
  return out


def main(argv):
  del argv
  cli.quiet_libraries()
  distributed.initialize()
  config = cli.CONFIG.value
  mesh, rules = sharding.make_mesh((1, 1, 1), jax.devices()[:1]), sharding.DEFAULT_RULES
  b, n, k = _BATCH.value, config.data.seq_len, _K.value
  arrays = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(  # noqa: E731
      shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape), rules))
  results = {'config': config.model.to_dict(), 'batch': b, 'seq_len': n, 'k': k}

  ar = train.teacher_model(config)
  opt = train_state.make_optimizer(config.train, 10)
  abstract = train_state.abstract_train_state(ar, opt, mesh, rules)
  lm_batch = {'tokens': arrays((b, n), jnp.int32), 'mask': arrays((b, n))}
  step = train_state.make_train_step(lambda p, x: train.lm_loss(ar, p, x), opt, abstract,
                                     {key: v.sharding for key, v in lm_batch.items()}, mesh, rules)
  results['teacher_step'] = _memory(step.lower(abstract, lm_batch).compile())
  print('teacher step', results['teacher_step'], flush=True)

  student = distill.student_model(config, k)
  teacher = train.teacher_model(config) if k == 1 else distill.student_model(config, k // 2)
  opt = train_state.make_optimizer(config.distill, 10)
  abstract = train_state.abstract_train_state(student, opt, mesh, rules)
  t_shard = train_state.param_shardings(teacher, mesh, rules)
  t_abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            teacher.param_shapes, t_shard)
  d_batch = dict(lm_batch, u=arrays((b, n, k)), tau=arrays((b,)), r=arrays((b, n, k)))
  step = train_state.make_train_step(
      lambda p, x, tp, ap: distill.distill_loss(student, teacher, config.distill, p, x, tp, ap),
      opt, abstract, {key: v.sharding for key, v in d_batch.items()}, mesh, rules,
      extra_args_shardings=(t_shard, None))
  results[f'distill_k{k}_step'] = _memory(step.lower(abstract, d_batch, t_abstract,
                                                     None).compile())
  print(f'distill k={k} step', results[f'distill_k{k}_step'], flush=True)
  if _OUTPUT.value and jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    with open(_OUTPUT.value, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  cli.run(main)
