"""Where lossless decoding and the AR teacher's own decoder part ways, and by how little.

  python -m kforcing_jax.benchmarks.lossless_mismatch --config=configs/shakespeare_tiny.py \
      --workdir=runs/paper_recipe --k=1 --batch=256

Decodes the evaluation prompts both ways (decode.generate_ar and lossless.generate_lossless,
same key, same batch) and, for every row that differs, finds the first differing position j,
recomputes the teacher's distribution there with one full forward over the AR row's tokens
< j, and prints how far that position's uniform u lies from the edge of the AR token's CDF
interval. Distances of a float32 ulp or two mean the two programs' float rounding put u on
different sides of one edge (the verify pass scores k+1 positions per row, the AR step one),
not a wrong accept rule.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from kforcing_jax import cli, data, decode, lossless, progress, rundir, sampling, sharding

_K = flags.DEFINE_integer('k', 1, 'Draft length (the student of stage K >= k drafts).')
_BATCH = flags.DEFINE_integer('batch', 256, 'Rows decoded together.')


def first_mismatches(config, workdir: str, k: int, batch: int) -> dict:
  layout = sharding.layout_from_config(config)
  tokenizer = data.load_tokenizer(config)
  teacher = rundir.load_export(rundir.teacher_dir(workdir), layout, config=config,
                               tokenizer=tokenizer)
  stage = min(s for s in rundir.student_stages(workdir) if s >= k)
  student = rundir.load_export(rundir.stage_dir(workdir, stage), layout, config=config,
                               tokenizer=tokenizer)
  prefix_len, gen_len = int(config.decode.prefix_len), int(config.decode.gen_len)
  temperature = float(config.decode.temperature)
  prompts = np.asarray(data.document_prefixes(config, config.eval.split, batch, prefix_len,
                                              tokenizer=tokenizer), np.int32)
  key = jax.random.key(config.seed)
  ar = np.asarray(decode.generate_ar(teacher.model, teacher.params, prompts, key, temperature,
                                     gen_len=gen_len))
  verified = np.asarray(lossless.generate_lossless(
      teacher.model, teacher.params, student.model, student.params, prompts,
      np.full(batch, prefix_len, np.int32), key, temperature, gen_len=gen_len, k=k)['tokens'])
  forward = jax.jit(lambda tokens: teacher.model.module(teacher.params)(tokens)[0][0, -1])
  mismatches = []
  for row in np.flatnonzero((ar != verified).any(axis=1)):
    j = int(np.flatnonzero(ar[row] != verified[row])[0])
    u = float(decode.position_uniforms(key, jnp.asarray([j]), batch)[row, 0])
    probs = sampling.probabilities(forward(jnp.asarray(ar[row:row + 1, :j])), temperature)
    lo, hi = sampling.token_cdf_interval(probs[None], jnp.asarray([ar[row, j]]),
                                         teacher.model.cfg.cdf_order)
    lo, hi = float(lo[0]), float(hi[0])
    mismatches.append({'row': int(row), 'position': j, 'ar_token': int(ar[row, j]),
                       'lossless_token': int(verified[row, j]), 'u': u, 'interval': [lo, hi],
                       'distance_to_edge': min(abs(u - lo), abs(hi - u))})
    progress.log(f'row {row} position {j}: AR token {ar[row, j]}, lossless '
                 f'{verified[row, j]}; u {u:.9f} vs the AR token\'s interval [{lo:.9f}, '
                 f'{hi:.9f}): {mismatches[-1]["distance_to_edge"]:.2e} from an edge')
  progress.log(f'{len(mismatches)} of {batch} rows differ (k={k}, student_k{stage}, '
               f'{batch * (gen_len - prefix_len)} generated positions); largest distance of u '
               f'from a CDF edge at a first mismatch: '
               f'{max((m["distance_to_edge"] for m in mismatches), default=0.0):.2e}')
  return {'k': k, 'stage': stage, 'batch': batch, 'mismatches': mismatches}


if __name__ == '__main__':
  cli.main(lambda config, workdir: first_mismatches(config, workdir, _K.value, _BATCH.value))
