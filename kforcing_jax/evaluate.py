"""Evaluate the AR teacher and every distilled student of a run: quality, speed, roofline
(METHOD.md s.5). `run(config, workdir)` writes the run's report directory (rundir.report_dir):
results.json (report.Results), REPORT.md, speedup.png and quality.png; it is skipped when
results.json exists (force=True re-runs it).

Models: "ar" (the teacher, kind 'ar', k = 1) sampled at config.decode.temperature, and
"pflm_k{k}" for every exported student stage (rundir.exports), decoded with its own k, tau = 1
and the frequency penalty decode.freq_penalty(config, k).

Quality (metrics.py): every model decodes the same prompts (the first config.decode.prefix_len
tokens of config.eval.num_samples held-out documents) with the same noise key, so position j
draws the same u in every model, to the fixed length config.decode.gen_len with no EOS stop
(the paper's fixed-length protocol). Metrics use the generated part only (positions >=
prefix_len):
  gen_ppl_*   exp(pooled mean NLL of the generated tokens) under the AR teacher, and under an
              independent AR evaluator (the teacher export of config.eval.evaluator_workdir, its
              architecture read from the checkpoint; it must share the tokenizer) or null;
  entropy     mean over samples of the entropy (nats) of the sample's token frequencies;
  distinct_n  unique n-grams / all n-grams, pooled over samples (n-grams never cross samples);
  acc_total   the stage's held-out agreement with its teacher under shared noise, from the
              stage's eval.json (null for AR).

Speed (timing.measure_throughput): the whole fixed-length generation (prefill included,
eos_id=None) at every config.eval.batch_sizes, all models in this process, interleaved, the
median of config.eval.repeats rounds. Speed prompts: the quality prompts tiled to the batch
size, the same for every model. Roofline: roofline.analyse.
"""

import json
import math
import time

import jax
import numpy as np

from kforcing_jax import data, decode, metrics, progress, report, roofline, rundir, sharding
from kforcing_jax import timing

NUM_REPORT_SAMPLES = 3
SPEED_PROMPTS = 'the quality prompts tiled to the batch size, identical for every model'


def load_decoders(config, workdir: str, layout, tokenizer) -> list[tuple]:
  """[(decode.Decoder, rundir.Export)] of the teacher, then every student stage."""
  dc = config.decode
  exports = [rundir.load_export(d, layout, config=config, tokenizer=tokenizer)
             for d in rundir.exports(workdir)]
  if not exports or exports[0].kind != 'ar':
    raise FileNotFoundError(f'{workdir} has no exported AR teacher: train it first (`python -m '
                            'kforcing_jax.main.pipeline` or `kforcing_jax.main.train`).')
  out = []
  for export in exports:
    if export.kind == 'pflm' and dc.prefix_len < export.k:
      raise ValueError(f'{export.name} decodes k={export.k} tokens per step but '
                       f'config.decode.prefix_len={dc.prefix_len} < k: its first step feeds the '
                       f'last k prompt tokens. Set --config.decode.prefix_len={export.k} or more.')
    dec = decode.decoder(export, layout, gen_len=dc.gen_len, eos_id=None,
                         penalty=decode.freq_penalty(config, export.k),
                         temperature=dc.temperature)
    out.append((dec, export))
  return out


def load_evaluator(config, layout, tokenizer) -> rundir.Export | None:
  """The independent AR evaluator (config.eval.evaluator_workdir's teacher), or None."""
  workdir = config.eval.evaluator_workdir
  if not workdir:
    return None
  try:
    return rundir.load_export(rundir.teacher_dir(workdir), layout, kind='ar', tokenizer=tokenizer,
                              dtype=config.model.dtype)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'config.eval.evaluator_workdir={workdir!r}: {e} Or set '
                            "--config.eval.evaluator_workdir=''.") from e


def decode_samples(dec, prompts: np.ndarray, key, batch_sizes) -> np.ndarray:
  """Decode all prompts in fixed-size chunks (the last one padded by repeating rows), of the
  largest speed batch size that fits, so the speed runs reuse the compiled loop. Chunk s gets
  the noise key fold_in(key, s), the same for every model."""
  num = prompts.shape[0]
  fitting = [b for b in batch_sizes if b <= num]
  chunk = max(fitting) if fitting else num
  total = math.ceil(num / chunk) * chunk
  padded = np.resize(prompts, (total, prompts.shape[1])).astype(np.int32)
  rows = [decode.to_host(dec(padded[s:s + chunk], jax.random.fold_in(key, s)))
          for s in range(0, total, chunk)]
  return np.concatenate(rows, axis=0)[:num]


def quality(dec, export, samples, teacher, evaluator, prefix_len: int, tokenizer) -> dict:
  """The quality fields of one model's report.ModelResult (no throughput yet)."""
  generated = samples[:, prefix_len:]
  acc = (progress.read_json(rundir.eval_path(export.directory)) or {}).get('acc_total')
  return dict(
      name=dec.name, kind=dec.kind, k=dec.k,
      gen_ppl_teacher=metrics.generative_perplexity(teacher.model, teacher.params, samples,
                                                    prefix_len),
      gen_ppl_evaluator=(None if evaluator is None else metrics.generative_perplexity(
          evaluator.model, evaluator.params, samples, prefix_len)),
      entropy=metrics.unigram_entropy(generated), distinct_2=metrics.distinct_n(generated, 2),
      distinct_4=metrics.distinct_n(generated, 4),
      acc_total=None if dec.kind == 'ar' or acc is None else float(acc),
      samples=[report.Sample(tokenizer.decode(row[:prefix_len].tolist()),
                             tokenizer.decode(row[prefix_len:].tolist()))
               for row in samples[:NUM_REPORT_SAMPLES]],
      **dec.settings)


def _prompts(config, prompts, tokenizer) -> np.ndarray:
  prefix_len = int(config.decode.prefix_len)
  if prompts is None:
    prompts = data.document_prefixes(config, config.eval.split, config.eval.num_samples,
                                      prefix_len, tokenizer=tokenizer)
  prompts = np.asarray(prompts, np.int32)
  if prompts.ndim != 2 or prompts.shape[1] != prefix_len:
    raise ValueError(f'prompts have shape {prompts.shape}; expected (num, {prefix_len}).')
  return prompts


def _with_speed(entry: dict, rows: list, ar_rows: list) -> report.ModelResult:
  ar_rate = {row['batch']: row['tokens_per_s'] for row in ar_rows}
  return report.ModelResult(**entry, throughput=[
      report.Throughput(**row, speedup_vs_ar=row['tokens_per_s'] / ar_rate[row['batch']])
      for row in rows])


def run(config, workdir: str, *, force: bool = False, prompts=None, tokenizer=None,
        config_name: str | None = None) -> report.Results:
  """Evaluate every model in `workdir` and write its report directory. Returns the results.

  `prompts` ((num, prefix_len) int array) and `tokenizer` default to the held-out split's
  document prefixes and the config's tokenizer (tests pass their own). `config_name`: the
  config file, for the report (the values are stored too)."""
  out_dir = rundir.report_dir(workdir)
  done = None if force else report.read(out_dir)
  if done is not None:
    progress.log(f'[evaluate] already done ({report.results_path(out_dir)}); skipping (use '
                 '--force to redo)')
    return done
  t_start = time.time()
  dc, ec = config.decode, config.eval
  prefix_len, gen_len = int(dc.prefix_len), int(dc.gen_len)
  if gen_len <= prefix_len:
    raise ValueError(f'config.decode.gen_len={gen_len} must exceed config.decode.prefix_len='
                     f'{prefix_len}.')
  layout = sharding.layout_from_config(config)
  if tokenizer is None:
    tokenizer = data.load_tokenizer(config)
    data.check_vocab(config, tokenizer)
  prompts = _prompts(config, prompts, tokenizer)
  batch_sizes = [int(b) for b in ec.batch_sizes]
  loaded = load_decoders(config, workdir, layout, tokenizer)
  progress.log('[evaluate] models: ' + ', '.join(d.name for d, _ in loaded))
  teacher, evaluator = loaded[0][1], load_evaluator(config, layout, tokenizer)
  key = jax.random.key(config.seed)
  entries = []
  for dec, export in loaded:
    t0 = time.time()
    samples = decode_samples(dec, prompts, key, batch_sizes)
    entries.append(quality(dec, export, samples, teacher, evaluator, prefix_len, tokenizer))
    progress.log(f'[evaluate] quality {dec.name}: {len(samples)} samples in '
                 f'{time.time() - t0:.1f}s, gen ppl (teacher) '
                 f'{entries[-1]["gen_ppl_teacher"]:.2f}, entropy {entries[-1]["entropy"]:.3f}')
  decoders = [dec for dec, _ in loaded]
  speed = timing.measure_throughput(decoders, prompts, key, batch_sizes, int(ec.repeats),
                                    prefix_len, gen_len)
  rf = roofline.analyse([(dec, export.model) for dec, export in loaded], speed, batch_sizes,
                        prefix_len, gen_len, config.model.dtype)
  results = report.Results(
      device=timing.device_name(), jax_version=jax.__version__,
      config=config_name or '<in-memory config>', prefix_len=prefix_len, gen_len=gen_len,
      eval_split=ec.split, num_samples=int(prompts.shape[0]), batch_sizes=batch_sizes,
      repeats=int(ec.repeats), seed=int(config.seed),
      evaluator_workdir=ec.evaluator_workdir or None, speed_prompts=SPEED_PROMPTS,
      models=[_with_speed(e, speed[e['name']], speed['ar']) for e in entries], roofline=rf,
      config_values=json.loads(config.to_json_best_effort()), seconds=time.time() - t_start)
  if progress.is_main_process():
    report.write(out_dir, results)
  else:
    report.Results.from_json(results.to_json())
  progress.log(f'[evaluate] wrote {out_dir}: results.json, REPORT.md, speedup.png, quality.png')
  return results
