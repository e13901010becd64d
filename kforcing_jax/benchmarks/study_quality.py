"""Generation quality of the recipe study's students: what their samples look like, not only how
often their tokens agree.

For every finished whole-schedule run of the named arms (results/distill_study/runs/<arm>/
seed<S>) it decodes the same test-split prompts with the AR teacher and each student (k = 1, 2,
4; with no frequency penalty and with the config's default), and scores the samples: gen-ppl under
the teacher (pooled, 95% bootstrap), unigram entropy, distinct-2, and the mode-seeking verdict of
metrics.is_mode_seeking. Same prompts and noise key for every model and run.

  python -m kforcing_jax.benchmarks.study_quality --config=configs/distill_study.py \
      --output=results/distill_study --arms=full_lr3e-3_soft0.2,full_invcdf,k1_invcdf \
      --seeds=0,1 --later_slot_temperatures=1,0.7,0.5,0.3

writes <output>/quality.json (merged: runs scored before and not named now are kept) and
<output>/QUALITY.md from all of it.
"""

import json
import os

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from kforcing_jax import data, decode, metrics, progress, rundir, sharding
from kforcing_jax.study import apply_overrides, arms_of

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/distill_study.py', 'study config')
_OUTPUT = flags.DEFINE_string('output', 'results/distill_study', 'the study output directory')
_RUNS = flags.DEFINE_string('runs', '', "where the study's runs are (default <output>/runs)")
_ARMS = flags.DEFINE_list('arms', [], 'whole-schedule arms to score')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1'], 'seeds')
_SAMPLES = flags.DEFINE_integer('num_samples', 64, 'completions per model')
_TEMPERATURES = flags.DEFINE_list(
    'later_slot_temperatures', ['1'], 'an inverse-CDF student is also decoded with its slots '
    '2..k at each of these temperatures (decode.pflm_decode_loop(later_slot_temperature=))')


def score(teacher, samples: np.ndarray, prefix_len: int) -> dict:
  nll, count = metrics.sample_nll(teacher.model, teacher.params, samples, prefix_len)
  generated = samples[:, prefix_len:]
  lo, hi = metrics.perplexity_interval(nll, count)
  return {'gen_ppl_teacher': metrics.pooled_perplexity(nll, count), 'gen_ppl_interval': [lo, hi],
          'entropy': metrics.unigram_entropy(generated),
          'distinct_2': metrics.distinct_n(generated, 2)}


def run_quality(config, workdir: str, prompts: np.ndarray, key,
                temperatures=(1.0,)) -> list[dict]:
  """Rows {'model', 'k', 'penalty', 'later_slot_temperature', metrics...} for the teacher and
  every student in workdir (an inverse-CDF student at k > 1 once per temperature)."""
  layout = sharding.layout_from_config(config)
  tokenizer = data.load_tokenizer(config)
  dc, prefix_len = config.decode, int(config.decode.prefix_len)
  teacher = rundir.load_export(rundir.teacher_dir(workdir), layout, kind='ar', config=config,
                               tokenizer=tokenizer)
  ar = np.asarray(decode.generate_ar(teacher.model, teacher.params, prompts, key, 1.0,
                                     gen_len=dc.gen_len))
  rows = [dict(model='ar', k=1, penalty=0.0, later_slot_temperature=1.0,
               **score(teacher, ar, prefix_len))]
  for k, _ in config.distill.stages:
    student = rundir.load_export(rundir.stage_dir(workdir, k), layout, kind='pflm',
                                 config=config, tokenizer=tokenizer)
    sampled = student.model.cfg.readout == 'inverse_cdf' and k > 1
    for penalty in sorted({0.0, decode.freq_penalty(config, k)}):
      for t in (temperatures if sampled else (1.0,)):
        out = np.asarray(decode.generate_pflm(student.model, student.params, prompts, key, 1.0,
                                              gen_len=dc.gen_len, k=k, freq_penalty=penalty,
                                              later_slot_temperature=float(t)))
        rows.append(dict(model=f'pflm_k{k}', k=k, penalty=penalty,
                         later_slot_temperature=float(t), **score(teacher, out, prefix_len)))
  base = rows[0]
  for row in rows:
    row['ppl_ratio'] = row['gen_ppl_teacher'] / base['gen_ppl_teacher']
    row['entropy_ratio'] = row['entropy'] / base['entropy']
    row['distinct_2_ratio'] = row['distinct_2'] / base['distinct_2']
    row['mode_seeking'] = metrics.is_mode_seeking(row['gen_ppl_teacher'], row['entropy'],
                                                  base['gen_ppl_teacher'], base['entropy'])
  return rows


def table(records: list[dict]) -> str:
  lines = ['| arm | seed | model | penalty | slots 2..k temperature | gen-ppl (teacher) [95%] | '
           'x AR | entropy (x AR) | distinct-2 (x AR) | mode-seeking |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for rec in records:
    for r in rec['rows']:
      lo, hi = r['gen_ppl_interval']
      lines.append(f'| {rec["arm"]} | {rec["seed"]} | {r["model"]} | {r["penalty"]:g} | '
                   f'{r["later_slot_temperature"]:g} | '
                   f'{r["gen_ppl_teacher"]:.1f} [{lo:.1f}, {hi:.1f}] | {r["ppl_ratio"]:.2f} | '
                   f'{r["entropy"]:.3f} ({r["entropy_ratio"]:.2f}) | {r["distinct_2"]:.3f} '
                   f'({r["distinct_2_ratio"]:.2f}) | {"yes" if r["mode_seeking"] else "no"} |')
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  base = _CONFIG.value
  arms = {a.name: a for a in arms_of(base)}
  unknown = [a for a in _ARMS.value if a not in arms]
  if unknown:
    raise app.UsageError(f'--arms: unknown {unknown}; the config has {sorted(arms)}')
  records = []
  for name in _ARMS.value:
    for seed in map(int, _SEEDS.value):
      workdir = os.path.join(_RUNS.value or os.path.join(_OUTPUT.value, 'runs'), name,
                             f'seed{seed}')
      config = apply_overrides(base, arms[name].overrides, seed)
      last = rundir.stage_dir(workdir, config.distill.stages[-1][0])
      if not os.path.exists(rundir.eval_path(last)):
        progress.log(f'[quality] {name} seed {seed}: not finished ({last}); skipped')
        continue
      with config.unlocked():
        config.eval.num_samples = _SAMPLES.value
      prompts = data.document_prefixes(config, config.eval.split, _SAMPLES.value,
                                       int(config.decode.prefix_len),
                                       tokenizer=data.load_tokenizer(config))
      # the same prompts and noise for every arm and seed: differences are the students'
      rows = run_quality(config, workdir, np.asarray(prompts, np.int32), jax.random.key(0),
                         tuple(map(float, _TEMPERATURES.value)))
      for r in rows:
        progress.log(f'[quality] {name} seed {seed} {r["model"]} penalty {r["penalty"]:g} '
                     f'T {r["later_slot_temperature"]:g}: '
                     f'gen-ppl {r["gen_ppl_teacher"]:.1f} ({r["ppl_ratio"]:.2f}x AR), entropy '
                     f'{r["entropy"]:.3f}, distinct-2 {r["distinct_2"]:.3f}'
                     f'{"  MODE-SEEKING" if r["mode_seeking"] else ""}')
      records.append({'arm': name, 'seed': seed, 'num_samples': _SAMPLES.value, 'rows': rows})
  # merged into what earlier invocations scored: a run scored again replaces its record
  path = os.path.join(_OUTPUT.value, 'quality.json')
  done = {(r['arm'], r['seed']) for r in records}
  if os.path.exists(path):
    with open(path) as f:
      kept = [r for r in json.load(f)['records'] if (r['arm'], r['seed']) not in done]
    records = kept + records
  progress.write_json(path, {'records': records})
  with open(os.path.join(_OUTPUT.value, 'QUALITY.md'), 'w') as f:
    f.write('# Generation quality of the study\'s students (kforcing_jax/benchmarks/'
            'study_quality.py)\n\n' + table(records))
  progress.log(f'[quality] wrote {_OUTPUT.value}/quality.json and QUALITY.md')


if __name__ == '__main__':
  app.run(main)
