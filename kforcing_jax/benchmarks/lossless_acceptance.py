"""Lossless decoding with a run's trained models: accepted drafts per iteration, exactness
against the AR teacher, and the speed-up over AR measured in one process.

  python -m kforcing_jax.benchmarks.lossless_acceptance --config=configs/shakespeare_tiny.py \
      --workdir=runs/paper_recipe --output=runs/paper_recipe/report/lossless.json [--batch_sizes=1,16,256]

For each student stage K of the run (and k < K from the widest stage) the AR teacher verifies
the student's k-token drafts (lossless.verify_loop) on the evaluation prompts
(`config.eval.num_samples` document prefixes of `decode.prefix_len` tokens, the same as
evaluate's): the acceptance histogram and mean tokens per teacher pass come from all prompts at
the largest batch size, and `identical_to_ar` says whether every row equals decode's AR
shared-noise sample of the same batch token for token (it must: that is what lossless means).
Speed: the whole fixed-length generation, lossless vs AR, interleaved, best of --repeats, per
batch size (noisy on a shared machine: read the ratio, not the absolute times).
"""

import jax
import numpy as np
from absl import flags

from kforcing_jax import cli, data, decode, lossless, progress, rundir, sharding, timing

_OUTPUT = flags.DEFINE_string('output', None, 'Result JSON (default: <workdir>/report/'
                              'lossless.json).')
_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['1', '16', '256'], 'Batch sizes to time.')
_REPEATS = flags.DEFINE_integer('repeats', 2, 'Timed rounds per setting; the fastest counts.')


def measure(config, workdir: str, batch_sizes: list[int], repeats: int) -> dict:
  layout = sharding.layout_from_config(config)
  tokenizer = data.load_tokenizer(config)
  teacher = rundir.load_export(rundir.teacher_dir(workdir), layout, config=config,
                               tokenizer=tokenizer)
  stages = rundir.student_stages(workdir)
  if not stages:
    raise FileNotFoundError(f'{workdir} has no student stage: run the pipeline first.')
  students = {k: rundir.load_export(rundir.stage_dir(workdir, k), layout, config=config,
                                    tokenizer=tokenizer) for k in stages}
  widest = stages[-1]
  # each stage at its own k, and the widest stage at every smaller k it was not trained alone for
  settings = [(k, k) for k in stages] + [(widest, k) for k in range(1, widest) if k not in stages]
  prefix_len, gen_len = int(config.decode.prefix_len), int(config.decode.gen_len)
  temperature = float(config.decode.temperature)
  prompts = np.asarray(data.document_prefixes(config, config.eval.split,
                                              max(batch_sizes), prefix_len,
                                              tokenizer=tokenizer), np.int32)
  key = jax.random.key(config.seed)
  rows = []
  for batch in sorted(batch_sizes):
    batch_prompts = prompts[:batch]
    lens = np.full(batch, prefix_len, np.int32)
    ar = lambda: decode.generate_ar(teacher.model, teacher.params, batch_prompts, key,  # noqa
                                    temperature, gen_len=gen_len)
    ar_tokens = np.asarray(ar())  # compile
    ar_seconds = min(timing.seconds(ar)[0] for _ in range(repeats))
    for stage, k in settings:
      student = students[stage]
      run = lambda: lossless.generate_lossless(  # noqa: E731
          teacher.model, teacher.params, student.model, student.params, batch_prompts, lens,
          key, temperature, gen_len=gen_len, k=k)
      out = jax.device_get(run())  # compile
      seconds = min(timing.seconds(run)[0] for _ in range(repeats))
      histogram = np.asarray(out['accepted_histogram']).tolist()
      row = {'batch': batch, 'stage': stage, 'k': k, 'ar_seconds': ar_seconds,
             'lossless_seconds': seconds, 'speedup_vs_ar': ar_seconds / seconds,
             'iterations': int(out['iterations']),
             'mean_tokens_per_iteration': float(out['mean_tokens_per_iteration']),
             'accepted_histogram': histogram,
             'identical_to_ar': bool(np.array_equal(np.asarray(out['tokens']), ar_tokens)),
             # rows whose tokens differ anywhere (benchmarks/lossless_mismatch says where and
             # how close to a CDF edge the first difference is)
             'rows_differing': int((np.asarray(out['tokens']) != ar_tokens).any(axis=1).sum()),
             'ar_steps_per_iteration': (seconds / int(out['iterations']))
                                       / (ar_seconds / (gen_len - prefix_len))}
      rows.append(row)
      progress.log(f'B={batch} student_k{stage} k={k}: {row["mean_tokens_per_iteration"]:.2f} '
                   f'tokens per teacher pass (accepted drafts {histogram}), '
                   f'{row["speedup_vs_ar"]:.2f}x AR, one iteration = '
                   f'{row["ar_steps_per_iteration"]:.2f} AR steps, identical to AR: '
                   f'{row["identical_to_ar"]}')
  return {'device': timing.device_name(), 'jax_version': jax.__version__,
          'workdir': workdir, 'prefix_len': prefix_len, 'gen_len': gen_len,
          'temperature': temperature, 'repeats': repeats, 'num_prompts': int(len(prompts)),
          'rows': rows}


def run(config, workdir: str) -> dict:
  output = _OUTPUT.value or str(rundir.report_dir(workdir)) + '/lossless.json'
  result = measure(config, workdir, [int(b) for b in _BATCH_SIZES.value], _REPEATS.value)
  if progress.is_main_process():
    progress.write_json(output, result)
  progress.log(f'-> {output}')
  return result


if __name__ == '__main__':
  cli.main(run)
