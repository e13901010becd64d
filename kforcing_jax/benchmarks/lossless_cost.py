"""Cost of one lossless iteration in AR-step units, and the break-even acceptance it implies.

  python -m kforcing_jax.benchmarks.lossless_cost --config=configs/test_tiny.py \
      --output=runs/bench/lossless_cost.json [--ks=1,2,4] [--batch_sizes=1,16]

A lossless iteration is a student draft pass (k+1 tokens + k hints) plus a teacher verify pass
(k+1 tokens); it yields (mean accepted + 1) tokens per row. Its cost does not depend on the
weights or on what is accepted (fixed-shape buffers), so random weights time it: the mean time
per loop iteration of a whole lossless generation, divided by the mean time per step of decode's
AR loop at the same batch size and length. Lossless beats AR when the mean tokens per iteration
exceed that ratio (the break-even); with a trained student, compare it with the measured mean
tokens per iteration (lossless.verify_loop's output).
"""

import jax
import numpy as np
from absl import flags

from kforcing_jax import cli, decode, lossless, models, progress, sharding, timing

_OUTPUT = flags.DEFINE_string('output', 'runs/bench/lossless_cost.json', 'Result JSON.')
_KS = flags.DEFINE_list('ks', ['1', '2', '4'], 'Draft lengths k to time.')
_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['1', '16'], 'Batch sizes to time.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed rounds; the fastest is reported.')


def random_params(model, layout, seed: int):
  """Fresh weights (a benchmark module of its own: importing decode_speed would define its
  flags a second time)."""
  return jax.jit(model.init, out_shardings=layout.param_shardings(model))(jax.random.key(seed))


def benchmark(config, output: str, ks: list[int], batch_sizes: list[int], repeats: int) -> dict:
  prefix_len, gen_len = max(config.decode.prefix_len, max(ks) + 1), config.decode.gen_len
  layout = sharding.layout_from_config(config)
  ar_model = models.teacher(config)
  ar_params = random_params(ar_model, layout, 0)
  students = {k: (models.student(config, k), random_params(models.student(config, k), layout, k))
              for k in ks}
  rows = []
  for batch in batch_sizes:
    prompts = np.random.default_rng(0).integers(2, config.model.vocab_size,
                                                (batch, prefix_len)).astype(np.int32)
    key = jax.random.key(0)
    ar_s = timing.best_seconds(
        lambda: decode.generate_ar(ar_model, ar_params, prompts, key, 1.0, gen_len=gen_len),
        repeats=repeats)
    ar_step = ar_s / (gen_len - prefix_len)
    for k, (student, student_params) in students.items():
      run = lambda: lossless.generate_lossless(  # noqa: E731
          ar_model, ar_params, student, student_params, prompts,
          np.full(batch, prefix_len, np.int32), key, 1.0, gen_len=gen_len, k=k)
      seconds = timing.best_seconds(run, repeats=repeats)
      iterations = int(run()['iterations'])
      ratio = seconds / iterations / ar_step
      rows.append({'batch': batch, 'k': k, 'ar_step_s': ar_step,
                   'iteration_s': seconds / iterations, 'iteration_in_ar_steps': ratio,
                   'break_even_tokens_per_iteration': ratio})
      progress.log(f'B={batch} k={k}: one lossless iteration = {ratio:.2f} AR steps '
                   f'(lossless wins above {ratio:.2f} tokens per iteration, at most {k + 1})')
  result = {'device': timing.device_name(), 'jax_version': jax.__version__,
            'model': {n: config.model[n] for n in ('d_model', 'num_layers', 'num_heads',
                                                   'vocab_size', 'dtype')},
            'prefix_len': prefix_len, 'gen_len': gen_len, 'repeats': repeats, 'rows': rows}
  if progress.is_main_process():
    progress.write_json(output, result)
  progress.log(f'-> {output}')
  return result


if __name__ == '__main__':
  cli.main(lambda config, workdir: benchmark(
      config, _OUTPUT.value, [int(k) for k in _KS.value],
      [int(b) for b in _BATCH_SIZES.value], _REPEATS.value))
