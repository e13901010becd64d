"""The demo's decode-step bounds quoted in README (issue 16): the k=4 step's FLOPs against the AR
step's (per step, per token), the compute- and bytes-bound speed-ups they imply, the AR step's
FLOPs per byte, and the kernels in each compiled step (XLA:CPU runs each on its own).

  PYTHONPATH=. .venv/bin/python results/decode_profile/step_bounds.py \
      > results/decode_profile/step_bounds.txt
"""
import re

import jax
import jax.numpy as jnp

from configs import shakespeare_tiny
from kforcing_jax import decode, models, roofline
from kforcing_jax.timing import decode_steps

config = shakespeare_tiny.get_config()
gen, prefix = config.decode.gen_len, config.decode.prefix_len
teacher, student = models.teacher(config), models.student(config, 4)
n_ar, n_k = decode_steps(prefix, gen, 1), decode_steps(prefix, gen, 4)
for batch in (1, 16, 256):
  ar = roofline.analytic_step_cost(teacher, 1, batch, gen)
  k4 = roofline.analytic_step_cost(student, 4, batch, gen)
  print(f'B={batch}: k=4 step / AR step FLOPs {k4["flops"] / ar["flops"]:.2f} '
        f'({k4["flops"] / ar["flops"] / 4:.3f} per token); compute-bound speed-up '
        f'{n_ar * ar["flops"] / (n_k * k4["flops"]):.2f}x, bytes-bound '
        f'{n_ar * ar["bytes"] / (n_k * k4["bytes"]):.2f}x; AR FLOPs per byte '
        f'{ar["flops"] / ar["bytes"]:.1f}')


def kernels(model, k):
  """Instructions in the entry computation of one compiled batch-1 step, by opcode."""
  cache = jax.eval_shape(lambda: decode.init_cache(model.cfg, 1, gen if k == 1 else gen + k))
  pos = jax.ShapeDtypeStruct((), jnp.int32)
  if k == 1:
    step = roofline._ar_step(model, 1.0)
    args = (model.param_shapes, cache, jax.ShapeDtypeStruct((1, 1), jnp.int32), pos,
            jax.ShapeDtypeStruct((1,), jnp.float32))
  else:
    step = roofline._pflm_step(model, k, 0.5)
    args = (model.param_shapes, cache, jax.ShapeDtypeStruct((1, k), jnp.int32), pos,
            jax.ShapeDtypeStruct((1, k, model.cfg.d_model), jnp.float32),
            jax.ShapeDtypeStruct((1, k), jnp.float32),
            jax.ShapeDtypeStruct((1, model.cfg.vocab_size), jnp.float32))
  text = jax.jit(step, donate_argnums=(1,)).lower(*args).compile().as_text()
  entry = text[text.index('ENTRY'):]
  counts = {}
  for line in entry[:entry.index('\n}')].split('\n')[1:]:
    match = re.search(r'= \S+ (\w[\w-]*)\(', line)
    if match:
      counts[match.group(1)] = counts.get(match.group(1), 0) + 1
  return {op: n for op, n in counts.items()
          if op not in ('parameter', 'get-tuple-element', 'tuple', 'constant', 'bitcast')}


for name, model, k in (('AR', teacher, 1), ('k=4', student, 4)):
  counts = kernels(model, k)
  print(f'{name} step kernels: {sum(counts.values())} '
        + ', '.join(f'{op} {n}' for op, n in sorted(counts.items(), key=lambda x: -x[1])))
